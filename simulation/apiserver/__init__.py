"""An in-process emulator of the Kubernetes core/v1 HTTP API, for end-to-end tests and the demo.

Where it sits: simulation only. Tests and the demo start an `ApiServer` and point the real
`kubernetes_asyncio` client of every service at its URL, so the services run unchanged against it.
Production services never import this package. It must never stand in for, proxy to, or talk to a
real cluster, never hold real credentials, and never listen beyond the address it is given
(loopback by default): everything lives in memory and nothing is enforced. The only connections it
makes are the calls to the admission webhooks a test gives it.

Its modules, each importing only those listed before it: `common` (the resources served, `Status`
errors), `selectors`, `patches`, `pod_rules`, `store` (objects, resourceVersions, history, watches),
`faults` (which request gets which injected fault; it imports none of the others), `admission` and
`server` (`ApiServer`: HTTP, the verbs, watch streams, the faults applied, the test hooks).

What it emulates (core/v1 only): pods, configmaps and events (namespaced) and nodes
(cluster-scoped); the subresources pods/binding, pods/status and nodes/status; the verbs get, list,
watch, create (with generateName), update, patch (merge, strategic merge, JSON patch) and delete;
one global resourceVersion bumped on every write; optimistic concurrency (409 Conflict on a stale
metadata.resourceVersion); label and field selectors on lists and watches; lists in pages as the
real API serves them (`limit` and `continue`: every page of one list from the first page's snapshot,
rebuilt from the retained history, in namespace/name order, `limit` matching objects a page and a
token while objects remain unscanned, so that with a selector the last page may hold none;
`metadata.continue`, and `metadata.remainingItemCount` when no selector was given; a token whose
snapshot the history no longer reaches answered 410 Expired with a token for an inconsistent
continuation, as after etcd's compaction; `resourceVersion` "0" with a limit served whole, as the
watch cache of a v1.31 API server does, and any other value with a limit as that exact snapshot);
watches that replay retained history from a resourceVersion, send synthetic ADDED events without
one, send BOOKMARK events, honour timeoutSeconds, turn selector transitions into ADDED/DELETED as
the real watch cache does, and answer a resourceVersion older than the retained history with an
ERROR event (410 Expired). Errors are always `Status` objects. Behaviours of the real API kept on
purpose: an update or patch that changes nothing is not a write (no new resourceVersion, no watch
event); writes to a pod or node ignore `status` and writes to their `status` subresource change only
`status`; binding answers `201` with a `Status` (not the Binding), and a Binding whose
metadata.name differs from the pod is refused.

Timing: with `watch_delay` every event a watch delivers (synthetic ADDED and history replays
included) is written no earlier than that many seconds after it was queued for that watch, in
order, as from a watch cache lagging behind etcd; a BOOKMARK is only sent when nothing is held back.

Faults (`Faults`, from a demo scenario's `api_faults` section or given by a test), injected into the
requests of chosen identities and resources the way a real API server shows them: latency before a
request is handled; 429 with `Retry-After`, in plain text as API Priority and Fairness writes it (the
one error that is not a `Status`), and 500 with an InternalError `Status`, both before anything is
done and on every verb, watch included; for a watch from a resourceVersion older than the current
one, 410 as the real watch cache answers a resourceVersion it forgot (HTTP 200, one ERROR event with
an Expired `Status`, end of stream); and open watches ended on a period without a final event,
cleanly or by a connection reset.
A refused write never happened: the real API's 500 after a commit (a timeout) is not emulated.

Mutating admission webhooks (`AdmissionWebhook`) on pod CREATE, as the real API server calls them:
`admission` says how. Pod validation, as the real API's ValidatePodCreate/ValidatePodUpdate, for
what scheduling gates need (a new pod's SchedulingGated condition, the spec fields a pod update may
change, a binding refused while gated): `pod_rules` lists the rules.

What it does NOT emulate:
- authentication and RBAC: bearer tokens are only recorded (`RequestRecord.identity`) and passed
  to webhooks as the username, never checked;
- admission beyond the mutating webhooks above: no validating webhooks or admission policies, no
  webhooks on other resources, subresources or operations, no reinvocation, no namespace or object
  selectors, no CEL (`AdmissionWebhook.matches` stands in for matchConditions), service references
  or caBundle (https is verified against the system's certificates), audit annotations or
  warnings; no quota, limit ranges or defaulting beyond `status.phase: Pending` for a new pod
  created without a status (the real API resets a new pod's status; this keeps a given one);
- validation beyond object names (RFC 1123 subdomains), kind/apiVersion, name/namespace agreement
  with the URL, Binding targets, selector syntax and the pod rules above (not: the pod's own
  schema, gate names and duplicates, how activeDeadlineSeconds may change, QoS immutability,
  metadata update rules, in-place resize);
- graceful deletion: DELETE removes any object, pods included, at once (no deletionTimestamp,
  grace period, finalizers or garbage collection); of DeleteOptions only preconditions are honoured;
- strategic merge semantics: a strategic merge patch is applied as an RFC 7386 merge patch, so lists
  are replaced whole rather than merged by key, and `$patch`/`$retainKeys` directives are not special;
- server-side apply (`application/apply-patch+yaml` gets 415), protobuf, table output, dry run,
  managed fields, metadata.generation;
- the resourceVersion of a list without `limit` (it is always served at the current one; the real
  API serves "0" from its watch cache, possibly older), a list with `limit` and a resourceVersion
  newer than the current one answered 504 at once (the real API waits a while first), the
  continue tokens' expiry by time (here only by the history kept: `history_limit` writes, or
  `expire_history`), `resourceVersionMatch`, `sendInitialEvents`, the legacy `/api/v1/watch/...`
  paths, deletecollection;
- Namespace objects and every other resource or API group (any namespace name is accepted);
- a watch from a resourceVersion newer than the current one just streams live changes (the real API
  waits, then answers 504 "Too large resource version");
- any controller: no scheduler, kubelet, node heartbeats, event aggregation or TTL.

Test hooks on `ApiServer`: `request_log` (webhook calls are not in it; each record says when the
request came and which faults it got), `bookmarks_sent`, `fail_next`, `drop_watches` (aborts the TCP
connections: the client sees `aiohttp.ClientPayloadError`), `expire_history`, `objects`,
`faults_injected` (counts by kind) and the settable `watch_delay`.

Concurrency: everything runs on one asyncio loop; every store operation is synchronous, hence atomic,
and each open watch gets its changes through its own asyncio.Queue, in resourceVersion order. A pod
create awaits its webhooks before its synchronous store operation, so other requests go on meanwhile.
"""

from simulation.apiserver.admission import AdmissionWebhook
from simulation.apiserver.faults import Faults
from simulation.apiserver.server import ApiServer, RequestRecord

__all__ = ["AdmissionWebhook", "ApiServer", "Faults", "RequestRecord"]
