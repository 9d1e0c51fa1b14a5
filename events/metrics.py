"""Every Prometheus metric mpsflow exports, in one place: its name, labels and meaning.

Where it sits: the services, the node agent and the bus's delivery policy update these objects as
they work; `services.kit.status` serves them at `/metrics` of each process (with the client's own
`process_*` and `python_*` metrics). They live in the client's default registry, one per process:
where several parts share a process (the tests, the simulated cluster), their label values tell
them apart (`service`, `consumer`, `node`). docs/observability.md lists them with the questions
they answer. Every metric has labels, so that a process shows only those it set.

Nothing here performs I/O, and nothing here may be read to make a decision: metrics report what
happened, they never steer it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Buckets for decisions and reconfigurations: milliseconds for an incremental plan, up to a
minute for a node that restarts its MPS daemons."""

# --- every service ---------------------------------------------------------------------------------

LEADER = Gauge(
    "mpsflow_leader",
    "1 while this replica holds its service's lease and serves, 0 while it stands by",
    ["service"],
)
CONSUMER_PENDING = Gauge(
    "mpsflow_consumer_pending_messages",
    "Messages a durable consumer had yet to be handed at its last delivery (consumer lag)",
    ["consumer"],
)
DELIVERIES = Counter(
    "mpsflow_consumer_deliveries",
    "Messages handed to a consumer's handler, by how they were settled",
    ["consumer", "outcome"],
)
DEAD_LETTERS = Counter(
    "mpsflow_dead_letters",
    "Messages terminated and recorded as dead letters, by cause (undecodable, permanent, failed)",
    ["consumer", "cause"],
)

# --- the planner -----------------------------------------------------------------------------------

DECISION_SECONDS = Histogram(
    "mpsflow_planner_decision_seconds",
    "Time to compute one plan: `full` from scratch, `incremental` on top of the last one",
    ["mode"],
    buckets=SECONDS_BUCKETS,
)
PODS = Gauge(
    "mpsflow_pods",
    "Slice pods in the latest plan: pending (waiting to be bound), placed, unplaced",
    ["state"],
)
PODS_UNPLACED = Gauge(
    "mpsflow_pods_unplaced",
    "Pending slice pods the latest plan could not place, by the class of its reason",
    ["reason"],
)
GPU_MEMORY_FREE = Gauge(
    "mpsflow_gpu_memory_free_gib",
    "GiB of opted-in GPUs' slice capacity that no used slice holds in the latest plan, by GPU model",
    ["model"],
)
GPU_MEMORY_STRANDED = Gauge(
    "mpsflow_gpu_memory_stranded_gib",
    "Free GiB on GPUs where not even the smallest waiting pod fits, while pods wait for room "
    "(fragmentation: memory that is free but serves nobody), by GPU model",
    ["model"],
)
NODES = Gauge(
    "mpsflow_nodes",
    "Opted-in nodes in the latest plan: planned, or excluded (impossible reports, no usable GPU, "
    "no report yet)",
    ["state"],
)

# --- the node agent and the MPS daemons ------------------------------------------------------------

RECONFIGURE_SECONDS = Histogram(
    "mpsflow_node_reconfigure_seconds",
    "From a node's desired config appearing in KV to the node agent answering it (applied or refused)",
    ["node", "outcome"],
    buckets=SECONDS_BUCKETS,
)
CONFIG_REFUSALS = Counter(
    "mpsflow_node_config_refusals",
    "Desired configs a node agent refused (it says why in NodeConfigFailed)",
    ["node"],
)
DAEMON_RESTARTS = Counter(
    "mpsflow_mps_daemon_restarts",
    "MPS control daemons started again on a GPU (by its UUID) after this process first started one",
    ["gpu"],
)
SLICE_OVERUSE = Counter(
    "mpsflow_slice_overuse",
    "Times a slice's processes were seen using more GPU memory than the slice",
    ["node"],
)

# --- the pod watcher and the config publisher ------------------------------------------------------

PODS_REJECTED = Counter(
    "mpsflow_pods_rejected",
    "Slice pods rejected for a rule they break (an Event on the pod says which)",
    ["rule"],
)
PODS_RELEASED = Counter(
    "mpsflow_pods_released",
    "Slice pods whose scheduling gate the pod watcher lifted, by the node they were released to",
    ["node"],
)
NODE_CONFIGS_WRITTEN = Counter(
    "mpsflow_node_configs_written",
    "Desired node configs the config publisher wrote to the node-config bucket, by node",
    ["node"],
)
