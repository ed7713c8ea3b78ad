"""The peer benchmark: its peers answer exactly like TorchServe's handler, its Locust user counts goodput
(correct labels only), its report judges the target from the numbers it is given."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from loadtest.peers.bench import free_port
from loadtest.peers.bench import main as peers_main
from loadtest.peers.common import ROUTE, archive_handler, classify
from loadtest.peers.contenders import Contender, RunningPeer, parse_contender
from loadtest.peers.report import peers_markdown, target_lines
from loadtest.report import machine
from tests.conftest import PORT_OFFSET
from training.model import CLASSES


def test_contenders_parse_and_refuse_unknown_servers_and_keys() -> None:
    assert parse_contender("torchserve") == Contender("torchserve", {})
    assert parse_contender("torchserve:workers=1,threads=2").options == {"workers": 1, "threads": 2}
    assert parse_contender("litserve:batch=16,delay=10").name == "litserve:batch=16,delay=10"
    for bad in ("tritonserver", "torchserve:workers=two", "fastapi-sync:netty=1", "litserve:batch"):
        with pytest.raises(ValueError):
            parse_contender(bad)


def run(server: str, round_: int, goodput: float, p99: float, failures: int = 0) -> dict:
    return {"server": server, "kind": server.split(":")[0], "round": round_, "goodput_per_s": goodput,
            "requests": 100, "correct": 93, "settings": {},
            "requests_per_s": goodput * 1.07, "failures": failures, "latency_ms": {"p50": p99 / 2, "p99": p99},
            "cpu_cores": {"server": 1.5, "locust": 0.4, "other": 0.1}}


def test_the_target_needs_1_1x_the_best_peer_of_the_round_at_no_worse_p99_and_no_failures() -> None:
    report = {"ceilings": [], "servers": ["torchserve", "fastapi-sync", "litserve", "torchserve:workers=1"], "runs": [
        run("torchserve", 1, 440.0, 90.0), run("fastapi-sync", 1, 400.0, 95.0), run("litserve", 1, 200.0, 120.0),
        run("torchserve", 2, 430.0, 99.0), run("fastapi-sync", 2, 400.0, 95.0),  # faster, but a worse p99
        run("torchserve", 3, 430.0, 90.0), run("fastapi-sync", 3, 400.0, 95.0),  # 1.075x only
        run("torchserve", 4, 500.0, 90.0, failures=1), run("fastapi-sync", 4, 400.0, 95.0),
        run("torchserve:workers=1", 1, 900.0, 10.0)]}  # an experiment is neither the product nor a peer
    lines = target_lines(report)
    assert len(lines) == 5
    assert "fastapi-sync" in lines[0] and "**1.10x**" in lines[0] and lines[0].endswith("**met**.")
    assert all(line.endswith("**not met**.") for line in lines[1:])
    assert lines[4].startswith("- All rounds, medians: TorchServe 435.0 goodput/s (p99 90 ms)")  # and a failure


def test_over_all_rounds_the_medians_are_judged_the_same_way() -> None:
    """One disturbed round (a worse p99) does not decide the whole run, nor does one lucky round."""
    report = {"ceilings": [], "servers": ["torchserve", "fastapi-sync", "litserve"], "runs": [
        run("torchserve", 1, 325.0, 88.0), run("fastapi-sync", 1, 264.0, 81.0), run("litserve", 1, 199.0, 120.0),
        run("torchserve", 2, 352.0, 77.0), run("fastapi-sync", 2, 231.0, 90.0), run("litserve", 2, 198.0, 120.0),
        run("torchserve", 3, 367.0, 72.0), run("fastapi-sync", 3, 234.0, 90.0), run("litserve", 3, 202.0, 120.0)]}
    lines = target_lines(report)
    assert lines[0].endswith("**not met**.") and lines[1].endswith("**met**.")
    assert lines[3] == ("- All rounds, medians: TorchServe 352.0 goodput/s (p99 77 ms) vs the best peer, fastapi-sync, "
                        "234.0/s (p99 90 ms): **1.50x**, target 1.1x at equal or lower p99 with 0 failures: **met**.")
    report["runs"][3] = run("torchserve", 2, 250.0, 77.0)
    report["runs"][6] = run("torchserve", 3, 240.0, 72.0)  # median goodput 250: 1.07x of 234
    assert target_lines(report)[3].endswith("**not met**.")


@pytest.mark.slow
def test_a_peer_answers_exactly_like_the_archives_handler(model_store: Path, tmp_path: Path,
                                                          test_images: list[tuple[bytes, int]]) -> None:
    bodies = [body for body, _ in test_images[:8]]
    expected = classify(archive_handler(model_store / "cifar10.mar", 1, 1), bodies)
    peer = RunningPeer(parse_contender("fastapi-sync:threads=2"), model_store / "cifar10.mar", free_port(),
                       tmp_path / "peer.log", bodies[0])
    try:
        answers = [requests.post(peer.url + ROUTE, data=body, headers={"Content-Type": "image/png"}, timeout=60)
                   for body in bodies]
        bad = requests.post(peer.url + ROUTE, data=b"not an image", headers={"Content-Type": "image/png"}, timeout=60)
    finally:
        peer.stop()
    assert [answer.json() for answer in answers] == json.loads(json.dumps(expected))
    assert bad.status_code == 415
    assert not peer.processes()  # stopped with every child


@pytest.mark.slow
def test_a_short_benchmark_counts_goodput_as_correct_labels_and_writes_its_report(
        model_store: Path, data_root: Path, tmp_path: Path, test_images: list[tuple[bytes, int]]) -> None:
    """TorchServe and a peer, each under the same short Locust load: every answer counted, only correct ones served."""
    code = peers_main(["--servers", "torchserve", "fastapi-async", "--model-store", str(model_store), "--rounds", "1",
                       "--users", "2", "--warm-up", "1", "--run-time", "3", "--ceiling-seconds", "0",
                       "--image-pool", "64", "--data-dir", str(data_root), "--output-dir", str(tmp_path / "out"),
                       "--docs-dir", str(tmp_path), "--report-name", "peers_test", "--port-base", str(18180 + PORT_OFFSET)])
    assert code == 0
    runs = {result["server"]: result for result in json.loads((tmp_path / "peers_test.json").read_text())["runs"]}
    assert set(runs) == {"torchserve", "fastapi-async"}
    # Locust walks the pool in order; what the model gets right there, computed in process, is the goodput.
    pool = [body for body, _ in test_images]  # the first 64 test images, a few of them misclassified
    labels = [answer["label"] for answer in classify(archive_handler(model_store / "cifar10.mar", 1, 1), pool)]
    truth = [CLASSES[label] for _, label in test_images]
    right = [label == true for label, true in zip(labels, truth)]
    assert not all(right)  # else goodput and answers could not be told apart
    for server, result in runs.items():
        assert result["failures"] == 0 and result["requests"] > 0, server
        expected = sum(right[i % len(right)] for i in range(result["requests"]))
        # up to one request per user in flight when the window closes
        assert abs(result["correct"] - expected) <= 2, (server, result["correct"], expected)
    assert runs["torchserve"]["settings"]["workers"] >= 1
    markdown = (tmp_path / "PEERS_TEST.md").read_text()
    assert "| fastapi-async |" in markdown and "| torchserve |" in markdown


def test_a_report_written_while_the_benchmark_runs_lists_only_the_servers_measured_so_far() -> None:
    report = {"date": "now", "machine": machine(), "plan": {"cores": 2, "default_workers": 2, "threads": 1},
              "command": "python -m loadtest peers", "users": 16, "warm_up_s": 10, "run_time_s": 30, "rounds": 3,
              "image_pool": 256, "archive": "model_store/cifar10.mar", "servers": ["torchserve", "litserve"],
              "runs": [dict(run("torchserve", 1, 400.0, 90.0), settings={"workers": 2})], "ceilings": []}
    markdown = peers_markdown(report, "peers.json")
    assert "| torchserve | workers 2 |" in markdown and "| litserve |" not in markdown
    assert markdown.startswith("# TorchServe settings side by side") and "## Target" not in markdown  # no peer yet
