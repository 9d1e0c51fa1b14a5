"""The simulated cluster behind `mpsflow demo` and the end-to-end tests; production code never imports it."""
