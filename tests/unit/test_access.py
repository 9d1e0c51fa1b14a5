"""The grants of `events.access` and the credentials `events.credentials` signs from them, offline.

What the server does with them is tests/integration/test_nats_permissions.py; here: the roles name
the consumers the services really create, no node agent's grant reaches another node's subject (by
NATS's own matching rules, for any two node names), and each `.creds` file carries its grants in a
JWT that the account's signing key signed, while the server's side of the trust names no user.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import nkeys
from hypothesis import given
from hypothesis import strategies as st

from events import access, subjects
from events.credentials import AUTH_CONFIG, KEYS_DIRECTORY, credentials_path, decode_jwt_claims, issue
from services.config_publisher import service as config_publisher
from services.planner import service as planner
from services.pod_watcher import service as pod_watcher


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    wanted, given_tokens = pattern.split("."), subject.split(".")
    for position, token in enumerate(wanted):
        if token == ">":
            return len(given_tokens) > position
        if position >= len(given_tokens) or token not in ("*", given_tokens[position]):
            return False
    return len(wanted) == len(given_tokens)


def test_the_roles_name_the_durables_the_services_consume_from() -> None:
    assert [d.name for d in access.POD_WATCHER_ROLE.durables] == [
        pod_watcher.UNPLACED_DURABLE,
        pod_watcher.RELEASE_DURABLE,
        pod_watcher.OVERUSE_DURABLE,
    ]
    assert [d.name for d in access.PLANNER_ROLE.durables] == [planner.DURABLE]
    assert [d.name for d in access.CONFIG_PUBLISHER_ROLE.durables] == [config_publisher.DURABLE]


def concrete(grant: str) -> str:
    """A subject a grant admits (its `>` made one token)."""
    return grant.replace(">", "x")


node_names = st.text(min_size=1, max_size=20)


@given(node_names, node_names)
def test_no_grant_of_one_node_agent_admits_a_subject_of_another(node_a: str, node_b: str) -> None:
    grants_a = access.grants(access.node_agent_role(node_a))
    grants_b = access.grants(access.node_agent_role(node_b))
    shared = {f"{access.JS_API}.STREAM.NAMES"}  # the start-up check, which names no node
    for mine, theirs in ((grants_a.publish, grants_b.publish), (grants_a.subscribe, grants_b.subscribe)):
        for subject in map(concrete, theirs):
            if subject in shared:
                continue
            admitted = [grant for grant in mine if matches(grant, subject)]
            assert (node_a == node_b) == bool(admitted), (subject, admitted)


def test_a_node_agent_may_only_publish_its_reports_and_ask_for_its_own_watcher() -> None:
    node = "gpu-1.example.com"
    token = subjects.encode_token(node)
    grants = access.grants(access.node_agent_role(node))
    watcher = access.key_watcher(subjects.node_config_key(node))
    assert set(grants.publish) == {
        subjects.gpus_subject(node),
        subjects.config_subject(node),
        f"mpsflow.overuse.{token}.>",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.KV_mpsflow-node-config.{watcher}.$KV.mpsflow-node-config.{token}",
        f"$JS.API.CONSUMER.MSG.NEXT.KV_mpsflow-node-config.{watcher}",
        f"$JS.API.CONSUMER.DELETE.KV_mpsflow-node-config.{watcher}",
    }
    assert grants.subscribe == (f"_INBOX.node-agent.{token}.>",)


def test_a_durable_with_one_filter_may_be_created_with_that_filter_only() -> None:
    grants = access.grants(access.CONFIG_PUBLISHER_ROLE)
    creates = [g for g in grants.publish if g.split(".")[3:6] == ["CREATE", "MPSFLOW", "config-publisher"]]
    assert creates == [f"$JS.API.CONSUMER.CREATE.MPSFLOW.config-publisher.{subjects.PLANNED_EVENTS}"]


def seed_of(directory: Path, name: str) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray((directory / KEYS_DIRECTORY / f"{name}.nk").read_bytes().strip()))


def creds_parts(path: Path) -> tuple[str, str]:
    lines = path.read_text().splitlines()
    return lines[lines.index("-----BEGIN NATS USER JWT-----") + 1], lines[
        lines.index("-----BEGIN USER NKEY SEED-----") + 1
    ]


def test_each_credentials_file_carries_its_grants_signed_by_the_accounts_signing_key(tmp_path: Path) -> None:
    written = issue(tmp_path, ["gpu-1"])
    signing = seed_of(tmp_path, "account-signing")
    account = seed_of(tmp_path, "account")
    for role in [*access.SERVICE_ROLES.values(), access.node_agent_role("gpu-1")]:
        path = credentials_path(tmp_path, role.identity)
        assert path in written
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        user_jwt, seed = creds_parts(path)
        header, payload, signature = user_jwt.split(".")
        assert signing.verify(f"{header}.{payload}".encode(), base64.urlsafe_b64decode(signature + "=="))
        claims = decode_jwt_claims(user_jwt)
        assert claims["iss"] == bytes(signing.public_key).decode()
        assert claims["sub"] == bytes(nkeys.from_seed(bytearray(seed.encode())).public_key).decode()
        assert claims["name"] == role.identity
        assert claims["nats"]["issuer_account"] == bytes(account.public_key).decode()
        grants = access.grants(role)
        assert claims["nats"]["pub"] == {"allow": list(grants.publish)}
        assert claims["nats"]["sub"] == {"allow": list(grants.subscribe)}
    admin = decode_jwt_claims(creds_parts(credentials_path(tmp_path, access.ADMIN))[0])
    assert "pub" not in admin["nats"] and "sub" not in admin["nats"]  # every right
    for key in (tmp_path / KEYS_DIRECTORY).iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_issuing_more_nodes_leaves_the_servers_trust_as_it_was(tmp_path: Path) -> None:
    issue(tmp_path, ["gpu-1"])
    trust = (tmp_path / AUTH_CONFIG).read_text()
    written = issue(tmp_path, [f"gpu-{n}" for n in range(2, 50)])
    assert tmp_path / AUTH_CONFIG not in written
    assert (tmp_path / AUTH_CONFIG).read_text() == trust
    assert "node-agent" not in trust
    assert credentials_path(tmp_path, access.node_agent_identity("gpu-49")).exists()


def rendered_grants() -> str:
    """The grants of the three services and of node gpu-1, as docs/security.md shows them."""
    blocks = []
    for role in [*access.SERVICE_ROLES.values(), access.node_agent_role("gpu-1")]:
        grants = access.grants(role)
        lines = [role.identity]
        for label, granted in (("publish", grants.publish), ("subscribe", grants.subscribe)):
            lines += [f"  {label if n == 0 else '':<10}{subject}" for n, subject in enumerate(granted)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def test_the_security_doc_shows_the_grants_the_code_makes() -> None:
    document = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert f"```text\n{rendered_grants()}\n```" in document, "docs/security.md section 2 is out of date"
