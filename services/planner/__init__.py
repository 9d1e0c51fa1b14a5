"""The planner: folds events into state and decides slice layouts; it never touches Kubernetes or GPUs."""
