"""The node agent: one per opted-in GPU node; makes the planned MPS slices real and reports GPU state.

It reads desired configs from the KV bucket and never talks to the Kubernetes API.
"""
