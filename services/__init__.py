"""The cluster-wide services (pod watcher, planner, config publisher), their runtime and the CLI."""
