"""The profile report's arithmetic (loadtest/cpu_profile.py): py-spy's collapsed stacks read back, samples
attributed to the first part of the request path they pass through. The profiled run itself is
``make profile`` (docs/PROFILE.md)."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

from loadtest.cpu_profile import (
    JVM_PARTS,
    PYTHON_PARTS,
    markdown,
    python_samples,
    summarise,
    thread_cpu,
    thread_groups,
)


def test_collapsed_stacks_are_read_innermost_first_with_their_counts(tmp_path: Path) -> None:
    collapsed = tmp_path / "worker.txt"
    collapsed.write_text("main (ts/model_service_worker.py:1);handle (ts/service.py:2);forward (torch/nn/x.py:3) 7\n"
                         "main (ts/model_service_worker.py:1);recv (socket.py:9) 3\n\n")
    assert python_samples(collapsed) == [
        (["forward (torch/nn/x.py:3)", "handle (ts/service.py:2)", "main (ts/model_service_worker.py:1)"], 7),
        (["recv (socket.py:9)", "main (ts/model_service_worker.py:1)"], 3)]


def test_samples_go_to_the_innermost_part_they_pass_through() -> None:
    samples = [
        (["org.apache.logging.log4j.Logger.info", "org.pytorch.serve.wlm.WorkerThread.run"], 2),
        (["io.netty.channel.nio.NioEventLoop.select"], 5),
        (["java.lang.Object.wait", "org.pytorch.serve.wlm.BatchAggregator.getRequest"], 3),
        (["java.lang.Thread.run"], 10),
    ]
    summary = summarise(samples, JVM_PARTS)
    assert summary["samples"] == 20
    assert summary["parts"]["logging (log4j)"] == 10.0  # inside the worker thread, but logging is where it is
    assert summary["parts"]["Netty I/O and HTTP codec"] == 25.0
    assert summary["parts"]["worker protocol (to and from the Python worker)"] == 15.0
    assert summary["parts"]["other"] == 50.0 and sum(summary["parts"].values()) == 100.0
    assert summary["top_self"][0] == {"frame": "java.lang.Thread.run", "percent": 50.0}


def test_a_worker_sample_in_the_model_is_not_counted_as_protocol() -> None:
    frames = ["run (onnxruntime/capi/onnxruntime_inference_collection.py:1)", "_run_onnx (cifar10_handler.py:2)",
              "handle (ts/service.py:3)", "handle_connection (ts/model_service_worker.py:4)"]
    assert summarise([(frames, 4)], PYTHON_PARTS)["parts"]["model (ONNX Runtime or torch)"] == 100.0


def burn(name: bytes, seconds: float, done: threading.Event, release: threading.Event) -> None:
    """Name this OS thread (what /proc shows, as the JVM names its threads), spend ``seconds`` of CPU, and
    stay alive until released: /proc forgets a thread once it ends."""
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name))  # PR_SET_NAME
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass
    done.set()
    release.wait(10)


def test_thread_cpu_is_counted_per_kind_of_thread() -> None:
    """Two threads of one kind (names differing only in numbers) are one row with both threads' CPU: the
    way the JIT compiler's CPU, which JFR does not sample, is found."""
    before, release = thread_cpu(os.getpid()), threading.Event()
    done = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=burn, args=(name, 0.3, flag, release))
               for name, flag in zip((b"Compiler-1", b"Compiler-22"), done)]
    for thread in threads:
        thread.start()
    try:
        assert all(flag.wait(10) for flag in done)
        groups = thread_groups(before, thread_cpu(os.getpid()))
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert 0.5 <= groups["Compiler-#"] <= 1.0
    assert "Compiler-1" not in groups and "Compiler-22" not in groups


def test_thread_groups_take_the_difference_and_merge_numbered_names() -> None:
    before = {1: ("C2 CompilerThre", 5.0), 2: ("epollEventLoopG", 1.0)}
    after = {1: ("C2 CompilerThre", 7.5), 2: ("epollEventLoopG", 1.5), 3: ("epollEventLoopG", 0.25),
             4: ("W-9000-cifar10_1.0", 0.5)}
    groups = thread_groups(before, after)
    assert groups == {"C# CompilerThre": 2.5, "epollEventLoopG": 0.75, "W-#-cifar#_#.#": 0.5}


def test_the_report_shows_both_windows_and_marks_what_one_of_them_lacks() -> None:
    """A thread kind seen only while profiling (JFR's own, or the JIT woken by JFR) reads n/a in the
    unprofiled column rather than being dropped or shown as zero."""
    window = {"answers_per_s": 200.0, "latency_ms": {"p99": 110.0}, "non_2xx": 0,
              "cores": {"frontend": 0.06, "workers": 1.8}, "cpu_ms_per_answer": {"frontend": 0.3, "workers": 9.0},
              "kernel_percent": {"frontend": 9.0, "workers": 2.5},
              "frontend_threads_ms_per_answer": {"epollEventLoopG": 0.13}}
    profiled = window | {"frontend_threads_ms_per_answer": {"C# CompilerThre": 1.6, "epollEventLoopG": 0.19}}
    summary = {"samples": 1, "parts": {"other": 100.0}, "top_self": []}
    report = {"command": "python -m loadtest profile", "date": "2026-12-06", "name": "profile", "seconds": 30,
              "warm_up_s": 60, "connections": 16,
              "machine": {"cpu": "test CPU", "cores": 2, "memory_gib": 1.0, "os": "test", "python": "3.11",
                          "versions": {}, "load_average": [0.0, 0.0, 0.0]},
              "result": {"unprofiled": window, "profiled": profiled, "frontend": summary, "workers": summary,
                         "processes": {"frontend": 1, "workers": 2, "decoders": 2}}}
    text = markdown(report)
    assert "| `C# CompilerThre` | n/a | 1.6 |" in text
    assert "| `epollEventLoopG` | 0.13 | 0.19 |" in text
    assert "| frontend | 0.06 | 0.3 | 9.0% | 0.06 | 0.3 |" in text
