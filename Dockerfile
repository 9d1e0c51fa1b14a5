# mpsflow's images: one build, two targets.
#   docker build --target control-plane -t ghcr.io/mpsflow/mpsflow:0.1.0 .
#   docker build --target node-agent    -t ghcr.io/mpsflow/mpsflow-node-agent:0.1.0 .
# The control plane (pod watcher, admission webhook, planner, config publisher) runs as a non-root user.
# The node agent runs as root: it starts MPS control daemons and serves the kubelet's device-plugin
# sockets on the host; the NVIDIA driver files it needs come from the container runtime, not this image.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY events ./events
COPY services ./services
COPY node_agent ./node_agent
COPY simulation ./simulation
COPY deploy/requirements.lock ./deploy/requirements.lock
RUN pip install --no-cache-dir --root-user-action=ignore --prefix=/install \
        --constraint deploy/requirements.lock .

FROM python:3.11.11-slim-bookworm AS runtime
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /install /usr/local
ENTRYPOINT ["mpsflow"]
CMD ["--help"]

FROM runtime AS node-agent

FROM runtime AS control-plane
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mpsflow
USER 10001:10001
