"""Stopping a process and everything it started: the one way every tool that starts servers does it."""
from __future__ import annotations

from collections.abc import Iterable

import psutil


def family(root: psutil.Process | int) -> list[psutil.Process]:
    """``root`` and its descendants, or nothing once it has exited."""
    try:
        root = root if isinstance(root, psutil.Process) else psutil.Process(root)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: Iterable[psutil.Process], grace: float = 20.0, terminate: bool = True) -> None:
    """SIGTERM every process (unless ``terminate`` is False: the caller asked them to stop another way),
    wait up to ``grace`` seconds, then SIGKILL what is left and reap it."""
    processes = list(processes)
    if terminate:
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
