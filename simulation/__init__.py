"""The simulated cluster behind `mpsflow demo` and the end-to-end tests.

No service imports it; only the CLI does, for `mpsflow demo` and the node agent's `--simulated-gpus`.
"""
