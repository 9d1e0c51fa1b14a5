"""The planner's functional core: plain functions over frozen values, no I/O, clock or randomness."""
