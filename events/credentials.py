"""Signed NATS credentials for the identities of `events.access`, and the server's side of them.

mpsflow runs NATS in operator (JWT) mode: an operator key signs two accounts (the system account and
mpsflow's); mpsflow's account signs, through a signing key of its own, one user per identity, whose
JWT carries that identity's permissions (`access.grants`). The server's config holds only the
operator's and the accounts' JWTs (`Authority.server_config`, resolver MEMORY): a user is checked
against the signature of its JWT, so adding the identity of node 1001 means signing one more user
JWT, with no change to the server's config and no reload. docs/security.md says why, and what
production still needs (who signs a node's credentials when the node joins).

`mpsflow credentials DIR` keeps the four seeds under DIR/keys (mode 0600; whoever holds the signing
key can mint any identity, so it never leaves the machine that issues credentials), writes
`nats-auth.conf` for the server once, and one `<identity>.creds` file per identity, in the standard
format every NATS client reads.

This module never talks to the network and never writes outside the directory it is given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from events import access

_UNLIMITED = -1
_ACCOUNT_LIMITS = {
    "subs": _UNLIMITED,
    "data": _UNLIMITED,
    "payload": _UNLIMITED,
    "imports": _UNLIMITED,
    "exports": _UNLIMITED,
    "wildcards": True,
    "conn": _UNLIMITED,
    "leaf": _UNLIMITED,
}
_JETSTREAM_LIMITS = {
    "mem_storage": _UNLIMITED,
    "disk_storage": _UNLIMITED,
    "streams": _UNLIMITED,
    "consumer": _UNLIMITED,
}
"""JetStream on for mpsflow's account; the streams' own limits (`events.bootstrap`) bound what it stores."""

_KEY_ROLES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "system-account": nkeys.PREFIX_BYTE_ACCOUNT,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "account-signing": nkeys.PREFIX_BYTE_ACCOUNT,
}
AUTH_CONFIG = "nats-auth.conf"
KEYS_DIRECTORY = "keys"


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _public(key: nkeys.KeyPair) -> str:
    return bytes(key.public_key).decode()


def _new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def encode_jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (header `ed25519-nkey`) saying `nats` of `subject`, signed by `issuer`; its `jti` is
    the SHA-512/256 of the claims, base32, as NATS's own tools make it."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": _public(issuer),
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _base64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _base64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_base64url(bytes(signature))}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a NATS JWT, unverified (for tools and tests that show what a credential grants)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def credentials_file(user_jwt: str, seed: str) -> str:
    """The standard `.creds` text: a user's JWT and the seed that proves it is theirs."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def user_claims(grants: access.Grants | None, issuer_account: str) -> dict[str, Any]:
    """A user's `nats` claims: its grants as allow lists (everything else is refused); None grants
    all (the admin)."""
    claims: dict[str, Any] = {
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
        "issuer_account": issuer_account,
        "type": "user",
        "version": 2,
    }
    if grants is not None:
        claims["pub"] = {"allow": list(grants.publish)}
        claims["sub"] = {"allow": list(grants.subscribe)}
    return claims


@dataclass(frozen=True)
class Authority:
    """The keys that vouch for every identity: the operator, the system account, mpsflow's account and
    the account's signing key, which signs the users."""

    operator: nkeys.KeyPair
    system_account: nkeys.KeyPair
    account: nkeys.KeyPair
    signing_key: nkeys.KeyPair

    @classmethod
    def load_or_create(cls, directory: Path) -> Authority:
        """The authority whose seeds are in `directory`, created (mode 0600) where missing."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys: dict[str, nkeys.KeyPair] = {}
        for role, prefix in _KEY_ROLES.items():
            path = directory / f"{role}.nk"
            if not path.exists():
                key = _new_key(prefix)
                _write_secret(path, bytes(key.seed).decode() + "\n")
            keys[role] = nkeys.from_seed(bytearray(path.read_bytes().strip()))
        return cls(keys["operator"], keys["system-account"], keys["account"], keys["account-signing"])

    @property
    def account_id(self) -> str:
        return _public(self.account)

    def server_config(self) -> str:
        """The server's side of the trust: the operator's JWT and the two accounts', preloaded. It
        names no user, so it stays the same however many identities are signed."""
        operator = _public(self.operator)
        system = _public(self.system_account)
        operator_jwt = encode_jwt(
            self.operator, operator, "mpsflow", {"system_account": system, "type": "operator", "version": 2}
        )
        system_jwt = encode_jwt(
            self.operator, system, "SYS", {"limits": _ACCOUNT_LIMITS, "type": "account", "version": 2}
        )
        account_jwt = encode_jwt(
            self.operator,
            self.account_id,
            "mpsflow",
            {
                "limits": {**_ACCOUNT_LIMITS, **_JETSTREAM_LIMITS},
                "signing_keys": [_public(self.signing_key)],
                "type": "account",
                "version": 2,
            },
        )
        return (
            "# Generated by `mpsflow credentials`: the operator and the accounts it trusts (no users).\n"
            f"operator: {operator_jwt}\n"
            f"system_account: {system}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {system}: {system_jwt}\n"
            f"  {self.account_id}: {account_jwt}\n"
            "}\n"
        )

    def credentials(self, identity: str, grants: access.Grants | None) -> str:
        """A new user for `identity` with `grants` (None: every right), as a `.creds` file's text."""
        user = _new_key(nkeys.PREFIX_BYTE_USER)
        user_jwt = encode_jwt(self.signing_key, _public(user), identity, user_claims(grants, self.account_id))
        return credentials_file(user_jwt, bytes(user.seed).decode())


def roles(nodes: Iterable[str]) -> list[access.Role]:
    """The roles whose credentials `mpsflow credentials` issues: every service, and each node's agent."""
    return [*access.SERVICE_ROLES.values(), *(access.node_agent_role(node) for node in nodes)]


def issue(directory: Path, nodes: Iterable[str]) -> list[Path]:
    """Write the credentials of the admin, every service and the agent of each of `nodes` into
    `directory`, with the authority kept in (or, the first time, created in) `directory/keys`, and the
    server's side of the trust, `nats-auth.conf`, where it is missing: issuing more identities never
    changes it. Returns the files written. Each run issues new users; those issued before stay valid."""
    authority = Authority.load_or_create(directory / KEYS_DIRECTORY)
    written = []
    trust = directory / AUTH_CONFIG
    if not trust.exists():
        trust.write_text(authority.server_config())
        written.append(trust)
    written.append(write_credentials(directory, authority, access.ADMIN, None))
    for role in roles(nodes):
        written.append(write_credentials(directory, authority, role.identity, access.grants(role)))
    return written


def credentials_path(directory: Path, identity: str) -> Path:
    """Where `mpsflow credentials` writes the credentials of `identity`."""
    return directory / f"{identity}.creds"


def write_credentials(
    directory: Path, authority: Authority, identity: str, grants: access.Grants | None
) -> Path:
    """Sign a new user for `identity` and write its `.creds` file (mode 0600)."""
    path = credentials_path(directory, identity)
    _write_secret(path, authority.credentials(identity, grants))
    return path


def _write_secret(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as sink:
        sink.write(text)
