"""Generated protobuf and gRPC modules for the kubelet APIs mpsflow speaks.

Written by node_agent/proto/generate.py from node_agent/proto/*.proto; do not edit.
"""
