"""``python -m loadtest [options]``: one load test. Subcommands: ``sweep`` (the benchmark sweep),
``report docs/benchmarks.json ...`` (render a sweep's report again from its JSON), ``faults`` (worker
faults under load), ``soak`` (the memory soak), ``peers`` (TorchServe against peer servers),
``first-run`` (fresh clone to first prediction, timed), ``hostile`` (costly inputs beside good traffic),
``replicas`` (replicas behind a load balancer through stops, a credential rotation and model updates),
``profile`` (where TorchServe's CPU goes per answer)."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"sweep": "loadtest.sweep", "report": "loadtest.report", "faults": "loadtest.faults",
               "soak": "loadtest.soak", "peers": "loadtest.peers.bench",
               "first-run": "loadtest.first_run", "hostile": "loadtest.hostile", "replicas": "loadtest.replicas",
               "profile": "loadtest.cpu_profile"}


def main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    from loadtest import run

    return run.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
