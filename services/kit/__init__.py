"""The services' shared runtime: process lifecycle, telemetry setup, Kubernetes client setup."""
