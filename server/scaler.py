"""Scales a running TorchServe's models to the serve-time worker plan (server.plan).

An archive's model-config.yaml only says how many workers start first (1). ``python -m
server start`` scales them to the plan once its models are loaded. The container's
entrypoint starts TorchServe itself (``exec``, so that tini signals it directly), so there this runs
beside it: it waits until the management API lists the models, scales each one to its planned
workers through the scale-workers API (allowed with the model API off), says so and exits.

    python -m server.scaler --workdir /var/lib/torchserve --config /app/config.effective.properties
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

from clients.management import Management, ScalingError
from server.config import SHIPPED_CONFIG, read_properties
from server.plan import ServingPlan, plan_from_environment


def scale_to_plan(management: Management, plan: ServingPlan, timeout: float) -> dict[str, int]:
    """Scale every registered model to its planned workers and wait until they run; workers per model."""
    scaled = {}
    for model in management.models():
        scaled[model] = plan.workers_of(model)
        management.scale(model, scaled[model], timeout=timeout)
    return scaled


def wait_and_scale(workdir: Path, management_url: str, plan: ServingPlan, timeout: float,
                   poll: float = 1.0, request_timeout: float = 120.0) -> dict[str, int]:
    """Scale once the key file exists and the management API lists at least one model; retry until
    ``timeout`` on any failure, then raise TimeoutError naming the last one.

    TorchServe registers every model of ``load_models`` before it opens its addresses, so the first
    non-empty list is the whole set. Scaling again to the same count is a no-op, so a retry after a
    partial failure is safe.
    """
    deadline = time.monotonic() + timeout
    last = "the management API listed no model"
    while True:
        try:
            remaining = max(1.0, min(request_timeout, deadline - time.monotonic()))
            # A client per attempt: each request, the key file's first read included, gets what is left.
            management = Management(workdir / "key_file.json", management_url, timeout=remaining)
            scaled = scale_to_plan(management, plan, timeout=remaining)
            if scaled:
                return scaled
        except (OSError, ValueError, KeyError, requests.RequestException, ScalingError) as error:
            last = f"{type(error).__name__}: {error}"  # not started yet (no key file, nothing listening) or refused
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done in {timeout:.0f} s; last: {last}")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.scaler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="TorchServe's start directory (key_file.json)")
    parser.add_argument("--config", type=Path, default=SHIPPED_CONFIG,
                        help="TorchServe's config.properties, for its management address (default: the shipped one)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default: 600)")
    args = parser.parse_args(argv)
    plan = plan_from_environment()
    management_url = read_properties(args.config)["management_address"]
    try:
        scaled = wait_and_scale(args.workdir, management_url, plan, args.timeout)
    except TimeoutError as error:
        print(f"workers not scaled to the plan (a model not scaled keeps its archive's count): {error}",
              file=sys.stderr, flush=True)
        return 1
    print(f"workers scaled to the plan for {plan.describe()}: "
          + ", ".join(f"{model} {workers}" for model, workers in scaled.items()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
