"""The profile report's arithmetic (loadtest/cpu_profile.py): py-spy's collapsed stacks read back, samples
attributed to the first part of the request path they pass through. The profiled run itself is
``make profile`` (docs/PROFILE.md)."""
from __future__ import annotations

from pathlib import Path

from loadtest.cpu_profile import JVM_PARTS, PYTHON_PARTS, python_samples, summarise


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
