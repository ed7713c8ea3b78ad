#!/bin/sh
# The container's processes: the secret-free health server (GET /live, /ready on HEALTH_BIND), the
# key renewer (keeps key_file.json valid: clients outside cannot reach the token API) and the worker
# scaler (one cifar10 worker per core the container is given, then it exits) in the background,
# TorchServe in the foreground. tini (PID 1, -g) signals all of them on stop.
set -eu
cd "$TS_WORKDIR"
mkdir -p "$LOG_LOCATION"
# A restarted container keeps /tmp: a stale pid file would make TorchServe refuse to start.
rm -f "${TMPDIR:-/tmp}/.model_server.pid"
# Workers x threads from the container's cores (CPU quota, cpuset), unless CIFAR10_WORKERS or
# CIFAR10_WORKER_THREADS say otherwise (docs/SERVING.md). TorchServe passes its environment to
# every worker: that is how the handler gets its threads.
plan="$(python -m server.plan)"
eval "$plan"
python -m server.health serve --bind "$HEALTH_BIND" --workdir "$TS_WORKDIR" --config "$TS_CONFIG" &
python -m server.renewer --workdir "$TS_WORKDIR" --config "$TS_CONFIG" &
# The scaler exits when done: started from a subshell, it is tini's child, which reaps it, not a
# zombie of the torchserve launcher that replaces this shell below.
(python -m server.scaler --workdir "$TS_WORKDIR" --config "$TS_CONFIG" &)
exec torchserve --start --foreground --ts-config "$TS_CONFIG" --ncs
