#!/bin/sh
# The container's one command: the replica's supervisor (server/supervisor.py). It starts TorchServe on
# the container's loopback (--foreground, model API on: register/unregister by name from the model store
# only, for python -m clients.rollout), the authenticating HAProxy on the client-facing ports (client keys
# from the Secret file ACCEPTED_CLIENTS_FILE, never on a command line), the health server, the key renewer and the
# worker scaler; restarts a dead helper; and on SIGTERM turns /ready off, drains for DRAIN_SECONDS, lets
# HAProxy finish what it holds and stops TorchServe. tini (PID 1) forwards SIGTERM to it alone.
set -eu
exec python -m server.supervisor --workdir "$TS_WORKDIR" --config "$TS_CONFIG" --client-keys "$ACCEPTED_CLIENTS_FILE" \
    --bind 0.0.0.0 --rest-port "$PROXY_REST_PORT" --grpc-port "$PROXY_GRPC_PORT" --health-bind "$HEALTH_BIND" \
    --drain-s "$DRAIN_SECONDS" --enable-model-api
