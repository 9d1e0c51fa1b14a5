"""The simulated cluster behind `mpsflow demo` and the end-to-end tests.

No service imports it: `mpsflow demo` plugs in through an entry point (`simulation.commands`), and
the demo runs each node agent over simulated GPUs through `simulation.simulated_agent`.
"""
