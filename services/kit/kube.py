"""Connecting to the Kubernetes API with kubernetes-asyncio.

`--kube-url` (or `MPSFLOW_KUBE_URL`) points at a given API server, with an optional bearer
token (`MPSFLOW_KUBE_TOKEN`); otherwise the in-cluster service account is used when present, and
the local kubeconfig when not.
"""

from __future__ import annotations

import os

from kubernetes_asyncio import client, config


async def api_client(url: str | None, token: str | None = None) -> client.ApiClient:
    configuration = client.Configuration()
    if url:
        configuration.host = url
        if token:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)
