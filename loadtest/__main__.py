"""``python -m loadtest [options]``: one load test; ``python -m loadtest sweep [options]``: the benchmark sweep;
``python -m loadtest peers [options]``: TorchServe against peer servers (docs/PEERS.md)."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["sweep"]:
        from loadtest import sweep

        return sweep.main(argv[1:])
    if argv[:1] == ["peers"]:
        from loadtest.peers import bench

        return bench.main(argv[1:])
    from loadtest import run

    return run.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
