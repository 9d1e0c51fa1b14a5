"""Property-based fuzzing of every boundary where outside input enters mpsflow.

One module per boundary: events on the bus (`test_bus.py`), `mpsflow plan` snapshots
(`test_snapshot.py`), `mpsflow demo` scenarios (`test_scenario.py`), pod and node objects from the
Kubernetes API (`test_pod_spec.py`) and node-config values in the KV bucket (`test_kv.py`). Each
property says what must happen to hostile input there: a clear error naming the field, or a dead
letter, never a crash and never a lost event. `profile.py` sizes the runs: a bounded profile in
`make test`, `MPSFLOW_FUZZ_EXAMPLES` examples per property in `make fuzz`; `garbage.py` holds the
strategies that damage valid input.
"""
