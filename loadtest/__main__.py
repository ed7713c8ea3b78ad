"""``python -m loadtest [options]``: one load test; ``python -m loadtest sweep|faults|soak [options]``: the
benchmark sweep, worker faults under load, and the memory soak."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["sweep"]:
        from loadtest import sweep

        return sweep.main(argv[1:])
    if argv[:1] == ["faults"]:
        from loadtest import faults

        return faults.main(argv[1:])
    if argv[:1] == ["soak"]:
        from loadtest import soak

        return soak.main(argv[1:])
    from loadtest import run

    return run.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
