"""The peer benchmark: its peers answer exactly like TorchServe's handler, its Locust user counts goodput
(correct labels only), its report judges the target from the numbers it is given."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from loadtest.peers import wrk
from loadtest.peers.bench import free_port
from loadtest.peers.bench import main as peers_main
from loadtest.peers.common import ROUTE, PeerConfig, archive_handler, classify
from loadtest.peers.contenders import Contender, RunningPeer, parse_contender, same_inference
from loadtest.peers.report import peers_markdown, target_lines
from loadtest.report import machine
from server.plan import plan_from_environment
from tests.conftest import PORT_OFFSET
from training.model import CLASSES


def test_contenders_parse_and_refuse_unknown_servers_and_keys() -> None:
    assert parse_contender("torchserve") == Contender("torchserve", {})
    assert parse_contender("torchserve:workers=1,threads=2").options == {"workers": 1, "threads": 2}
    assert parse_contender("litserve:batch=16,delay=10").name == "litserve:batch=16,delay=10"
    assert parse_contender("rayserve:processes=1").options == {"processes": 1}
    for bad in ("tritonserver", "fastapi-async", "torchserve:workers=two", "fastapi:batch=8", "bentoml:delay=5",
                "litserve:batch"):
        with pytest.raises(ValueError):
            parse_contender(bad)


def test_the_shipped_torchserve_and_the_peers_must_run_the_same_inference_processes_x_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFAR10_WORKERS", raising=False)
    monkeypatch.delenv("CIFAR10_WORKER_THREADS", raising=False)
    workers = plan_from_environment().default_workers
    peers = [parse_contender(kind) for kind in ("torchserve", "fastapi", "litserve", "rayserve", "bentoml")]
    assert {peer.inference() for peer in peers} == {(workers, 1)}  # one single-threaded process per core, everywhere
    same_inference(peers)
    same_inference([*peers, parse_contender("torchserve:workers=1,threads=3")])  # an experiment is not compared
    with pytest.raises(ValueError, match="litserve:processes=7,threads=1 7x1"):
        same_inference([*peers, parse_contender("litserve:processes=7,threads=1")])
    with pytest.raises(ValueError, match="same inference processes x threads"):
        same_inference([parse_contender("fastapi"), parse_contender("bentoml:threads=2")])


def run(server: str, round_: int, goodput: float, p99: float, failures: int = 0, wrk_rate: float | None = None,
        wrk_p99: float | None = None, server_cores: float = 1.5) -> dict:
    """One run as the benchmark records it; wrk saw ``wrk_rate`` answers/s (default: Locust's answers/s)."""
    answers = goodput * 1.07
    return {"server": server, "kind": server.split(":")[0], "round": round_, "goodput_per_s": goodput,
            "requests": 100, "correct": 93, "settings": {}, "inference": {"processes": 2, "threads": 1},
            "requests_per_s": answers, "failures": failures, "latency_ms": {"p50": p99 / 2, "p99": p99},
            "cpu_cores": {"server": server_cores, "client": 0.15, "other": 0.0},
            "wrk": {"requests": 1000, "requests_per_s": wrk_rate or answers, "non_2xx": 0, "socket_errors": 0,
                    "latency_ms": {"p50": (wrk_p99 or p99) / 2, "p99": wrk_p99 or p99},
                    "cpu_cores": {"server": server_cores, "client": 0.05, "other": 0.0}}}


def ceiling(round_: int, per_cpu: float) -> dict:
    return {"round": round_, "processes": 2, "threads": 1, "batch_size": 8, "pipeline_images_per_s": 600.0,
            "pipeline_images_per_cpu_s": per_cpu, "model_images_per_s": 700.0}


def three_rounds() -> dict:
    """TorchServe 1.14x FastAPI's goodput at a lower p99 on the medians, one round disturbed (a worse p99)."""
    return {"servers": ["torchserve", "fastapi", "litserve", "torchserve:workers=1"], "runs": [
        run("torchserve", 1, 440.0, 60.0), run("fastapi", 1, 390.0, 65.0), run("litserve", 1, 300.0, 90.0),
        run("torchserve", 2, 460.0, 80.0), run("fastapi", 2, 400.0, 60.0), run("litserve", 2, 310.0, 90.0),
        run("torchserve", 3, 450.0, 61.0), run("fastapi", 3, 395.0, 64.0), run("litserve", 3, 305.0, 90.0),
        run("torchserve:workers=1", 1, 900.0, 10.0)],  # an experiment is neither the product nor a peer
        "ceilings": [ceiling(1, 320.0), ceiling(2, 330.0), ceiling(3, 310.0)]}


def test_the_targets_are_judged_per_client_on_medians_over_the_rounds() -> None:
    lines = target_lines(three_rounds())
    assert lines[0] == ("- Locust (goodput: correct labels/s): TorchServe 450.0/s (p99 61 ms) vs the best peer, fastapi, "
                        "395.0/s (p99 64 ms): **1.14x**, target 1.1x at equal or lower p99 with 0 failures: **met**.")
    assert "wrk" in lines[1] and "fastapi" in lines[1] and lines[1].endswith("**met**.")
    # 450 x 1.07 answers/s over 1.5 server cores against the pipeline's median 320 images per CPU-second
    assert lines[2].startswith("- Per CPU-second, locust's window") and "**100%**" in lines[2]
    assert lines[2].endswith("**met**.") and len(lines) == 4


def test_each_target_fails_on_its_own_terms() -> None:
    report = three_rounds()
    report["runs"][3] = run("torchserve", 2, 460.0, 80.0, failures=1)
    assert target_lines(report)[0].endswith("**not met**.")  # one failure in any round
    report = three_rounds()
    for index in (0, 3, 6):  # wrk sees TorchServe at only 1.05x FastAPI's answers/s
        report["runs"][index]["wrk"]["requests_per_s"] = report["runs"][index + 1]["wrk"]["requests_per_s"] * 1.05
    lines = target_lines(report)
    assert lines[0].endswith("**met**.") and "**1.05x**" in lines[1] and lines[1].endswith("**not met**.")
    report = three_rounds()
    for index in (0, 3, 6):  # the same answers for 1.9 cores: 253 per CPU-second, 79% of 320
        report["runs"][index] = run("torchserve", index // 3 + 1, 450.0, 61.0, server_cores=1.9)
    assert "**79%**" in target_lines(report)[2] and target_lines(report)[2].endswith("**not met**.")
    report = three_rounds()
    report["runs"][2 * 3 + 1] = run("fastapi", 3, 395.0, 59.0)  # FastAPI's median p99 drops below TorchServe's
    assert target_lines(report)[0].endswith("**not met**.")


def test_fewer_than_three_rounds_are_not_judged() -> None:
    report = three_rounds()
    report["runs"] = [run for run in report["runs"] if run["round"] < 3]
    assert target_lines(report) == ["- Not judged: TorchServe ran 2 round(s); the targets are judged on the medians "
                                    "of at least 3 alternating rounds."]


def test_wrks_report_is_read_in_milliseconds() -> None:
    output = """Running 5s test @ http://127.0.0.1:8080
  1 threads and 16 connections
  Latency Distribution
     50%  812.00us
     75%   30.10ms
     90%   41.32ms
     99%    1.20s
  2113 requests in 5.01s, 1.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    421.75
Transfer/sec:    306.49KB
"""
    assert wrk.parse(output) == {"requests": 2113, "requests_per_s": 421.75, "non_2xx": 4, "socket_errors": 3,
                                 "latency_ms": {"p50": 0.8, "p90": 41.3, "p99": 1200.0}}
    with pytest.raises(ValueError):
        wrk.parse("wrk: connection refused")


def in_process(model_store: Path, tmp_path: Path) -> Any:
    """The archive's handler in this process, as every peer loads it."""
    return archive_handler(PeerConfig(str(model_store / "cifar10.mar"), 0, 1, 1, 1, 0.0, str(tmp_path / "in-process")))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fastapi", "bentoml"])
def test_a_peer_answers_exactly_like_the_archives_handler(kind: str, model_store: Path, tmp_path: Path,
                                                          test_images: list[tuple[bytes, int]]) -> None:
    if kind == "bentoml":
        pytest.importorskip("bentoml", reason="a peer of make peers only (the bench extra), not of make test")
    bodies = [body for body, _ in test_images[:8]]
    expected = classify(in_process(model_store, tmp_path), bodies)
    peer = RunningPeer(parse_contender(kind), model_store / "cifar10.mar", free_port(), tmp_path / "peer", bodies[0])
    try:
        answers = [requests.post(peer.url + ROUTE, data=body, headers={"Content-Type": "image/png"}, timeout=60)
                   for body in bodies]
        bad = requests.post(peer.url + ROUTE, data=b"not an image", headers={"Content-Type": "image/png"}, timeout=60)
    finally:
        peer.stop()
    assert [answer.json() for answer in answers] == json.loads(json.dumps(expected))
    assert bad.status_code == 415
    assert peer.inference == {"processes": plan_from_environment().default_workers, "threads": 1}  # counted, not assumed
    assert not peer.processes()  # stopped with every child


@pytest.mark.slow
def test_a_short_benchmark_counts_goodput_as_correct_labels_and_writes_its_report(
        model_store: Path, data_root: Path, tmp_path: Path, test_images: list[tuple[bytes, int]]) -> None:
    """TorchServe and a peer, each under the same short Locust load and then wrk's: every answer counted, only
    correct ones served."""
    code = peers_main(["--servers", "torchserve", "fastapi", "--model-store", str(model_store), "--rounds", "1",
                       "--users", "2", "--warm-up", "1", "--run-time", "3", "--wrk-time", "2" if wrk.available() else "0",
                       "--ceiling-seconds", "0",
                       "--image-pool", "64", "--data-dir", str(data_root), "--output-dir", str(tmp_path / "out"),
                       "--docs-dir", str(tmp_path), "--report-name", "peers_test", "--port-base", str(18180 + PORT_OFFSET)])
    assert code == 0
    runs = {result["server"]: result for result in json.loads((tmp_path / "peers_test.json").read_text())["runs"]}
    assert set(runs) == {"torchserve", "fastapi"}
    # Locust walks the pool in order; what the model gets right there, computed in process, is the goodput.
    pool = [body for body, _ in test_images]  # the first 64 test images, a few of them misclassified
    labels = [answer["label"] for answer in classify(in_process(model_store, tmp_path), pool)]
    truth = [CLASSES[label] for _, label in test_images]
    right = [label == true for label, true in zip(labels, truth)]
    assert not all(right)  # else goodput and answers could not be told apart
    for server, result in runs.items():
        assert result["failures"] == 0 and result["requests"] > 0, server
        expected = sum(right[i % len(right)] for i in range(result["requests"]))
        # up to one request per user in flight when the window closes
        assert abs(result["correct"] - expected) <= 2, (server, result["correct"], expected)
        assert result["inference"] == runs["torchserve"]["inference"], server  # counted, the same for both
        if wrk.available():  # make peers needs it; a test machine without it still checks the rest
            wrk_run = result["wrk"]
            assert wrk_run["requests"] > 0 and wrk_run["non_2xx"] == 0 and wrk_run["cpu_cores"]["server"] > 0, server
    assert runs["torchserve"]["settings"]["workers"] >= 1
    markdown = (tmp_path / "PEERS_TEST.md").read_text()
    assert "| fastapi |" in markdown and "| torchserve |" in markdown


def test_a_report_written_while_the_benchmark_runs_lists_only_the_servers_measured_so_far() -> None:
    report = {"date": "now", "machine": machine(), "plan": {"cores": 2, "default_workers": 2, "threads": 1},
              "command": "python -m loadtest peers", "users": 16, "warm_up_s": 10, "run_time_s": 30, "rounds": 3,
              "wrk_time_s": 30, "wrk_threads": 1,
              "image_pool": 256, "archive": "model_store/cifar10.mar", "servers": ["torchserve", "litserve"],
              "runs": [dict(run("torchserve", 1, 400.0, 90.0), settings={"workers": 2})], "ceilings": []}
    markdown = peers_markdown(report, "peers.json")
    assert "| torchserve | 2 x 1 | workers 2 |" in markdown and "| litserve |" not in markdown
    assert markdown.startswith("# TorchServe settings side by side") and "## Target" not in markdown  # no peer yet
    assert "1 round(s) (of 3 asked for)" in markdown
