"""``python -m loadtest profile``: where TorchServe's CPU goes per answer, in the frontend and in the workers.

    python -m loadtest profile                    # docs/profile.json + docs/PROFILE.md (make profile)
    python -m loadtest profile --seconds 10 --report-name profile_try --docs-dir build

TorchServe as shipped (the peers' ``torchserve`` contender) under wrk (the peers' C client: the same
CIFAR-10 PNGs, closed loop), warmed up, then two measured windows. In both

- the CPU time of the frontend (the JVM), of the workers (each with the decoder processes it forks)
  and of wrk is read from /proc, as milliseconds of CPU per answer;
- the CPU time of each of the frontend's threads is read from /proc, grouped by thread name: JFR does
  not see the JIT compiler, the garbage collector or Netty's native transport.

The first window runs without profilers: its CPU per answer is the server's own. In the second

- JFR, the JDK's own sampling profiler (``jcmd JFR.start``), samples the frontend's Java threads;
- py-spy samples the Python stacks of every worker process (``--nonblocking``: the worker is not paused).

Both profilers cost CPU, and starting JFR sets the JIT compiler to work again, so the second window is
for where the time goes, not how much there is. The report lists, per side, the methods most often
on CPU (self samples) and the share of samples inside each part of the request path.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from clients.tokens import bearer, read_key_file
from loadtest.cpu_usage import GroupMeter
from loadtest.images import test_images
from loadtest.peers import wrk
from loadtest.peers.contenders import RunningTorchServe, parse_contender
from loadtest.report import machine, machine_line, write_json
from loadtest.run import bounded, check_data_dir
from server.config import REPO_ROOT
from server.java import java_home
from training.data import default_data_dir

# Parts of the request path, by the frames a sample passes through (the first part that matches wins).
JVM_PARTS = {
    "logging (log4j)": ("org.apache.logging.",),
    "metrics": ("org.pytorch.serve.metrics.", "org.pytorch.serve.util.messages.Metric", "io.prometheus."),
    "worker protocol (to and from the Python worker)": ("org.pytorch.serve.util.codec.", "org.pytorch.serve.wlm."),
    "HTTP handling (TorchServe's handlers, auth)": ("org.pytorch.serve.http.", "org.pytorch.serve.util."),
    "JSON": ("com.google.gson.",),
    "Netty I/O and HTTP codec": ("io.netty.",),
}
PYTHON_PARTS = {
    "model (ONNX Runtime or torch)": ("_run_onnx (", "_run_torch (", "onnxruntime/", "torch/nn/"),
    "decoding (the decoder processes)": ("serve_jobs (", "_decode (", "check_structure (", "open_image (",
                                         "load_rgb (", "model_pixels (", "PIL/"),
    "preprocess (batching the pixels)": ("preprocess (", "_read ("),
    "postprocess (softmax, answer dicts)": ("postprocess (", "_answer (", "_prediction (", "_probabilities ("),
    "metrics and logging": ("ts/metrics/", "logging/"),
    "worker protocol (frames, JSON)": ("ts/protocol/", "ts/model_service_worker.py", "ts/service.py", "socket.py",
                                       "json/"),
}
TOP = 15


def py_spy() -> str | None:
    """py-spy on PATH, else beside this Python (a venv run without activating it)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def kernel_and_user(processes: list[psutil.Process]) -> tuple[float, float]:
    """CPU seconds in the kernel and in user space, summed; JFR samples only the JVM's Java code, so the
    kernel's share (socket reads and writes, epoll) tells what it cannot see."""
    kernel = user = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        kernel, user = kernel + times.system, user + times.user
    return kernel, user


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of a process, by thread id, with the thread's name."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended since the directory was listed
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return threads


def thread_groups(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> Counter:
    """CPU seconds spent between two ``thread_cpu`` readings per kind of thread: the name with its numbers
    replaced by ``#`` ("C2 CompilerThre", "epollEventLoopG", "W-9000-cifar10_1.0" -> "W-#-cifar#_#.#")."""
    groups = Counter()
    for tid, (name, seconds) in after.items():
        groups[re.sub(r"\d+", "#", name)] += seconds - before.get(tid, (name, 0.0))[1]
    return groups


def jvm_samples(recording: Path) -> list[list[str]]:
    """Each JFR execution sample as its frames, innermost first (``package.Class.method``)."""
    jfr = Path(java_home()) / "bin" / "jfr"
    printed = subprocess.run([str(jfr), "print", "--json", "--stack-depth", "64", "--events", "jdk.ExecutionSample",
                              str(recording)], capture_output=True, text=True, check=True).stdout
    samples = []
    for event in json.loads(printed)["recording"]["events"]:
        frames = event["values"]["stackTrace"]["frames"] if event["values"].get("stackTrace") else []
        samples.append([f"{frame['method']['type']['name']}.{frame['method']['name']}".replace("/", ".")
                        for frame in frames])
    return samples


def python_samples(collapsed: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output as (frames innermost first, count)."""
    samples = []
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";")[::-1], int(count)))
    return samples


def summarise(samples: list[tuple[list[str], int]], parts: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Top self frames, and the share of samples in each part: the innermost frame that belongs to a part
    decides, so that time in the logger called from the worker thread counts as logging."""
    total = sum(count for _, count in samples) or 1
    own, in_part = Counter(), Counter()
    for frames, count in samples:
        own[frames[0] if frames else "(no stack)"] += count
        part = next((name for frame in frames for name, patterns in parts.items()
                     if any(pattern in frame for pattern in patterns)), "other")
        in_part[part] += count
    return {"samples": total,
            "top_self": [{"frame": frame, "percent": round(100 * count / total, 1)} for frame, count in own.most_common(TOP)],
            "parts": {name: round(100 * in_part[name] / total, 1) for name in [*parts, "other"]}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=bounded(5, 600), default=30, help="measured window (default: 30)")
    parser.add_argument("--warm-up", type=bounded(1, 600), default=60,
                        help="seconds of load first: the JVM's JIT compiler works through the first ~60 s (default: 60)")
    parser.add_argument("--connections", type=bounded(1, 1000), default=16, help="wrk's connections (default: 16)")
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")
    parser.add_argument("--port-base", type=int, default=18350)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "profile")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--report-name", default="profile", help="writes DOCS_DIR/NAME.json and NAME in capitals.md")
    return parser


def measure_window(url: str, script: Path, args: argparse.Namespace, frontend: psutil.Process,
                   workers: list[psutil.Process], log: Path) -> dict[str, Any]:
    """One wrk window of ``args.seconds`` with ``args.connections``: answers/s and latency, and the CPU per
    answer of each process group and of each kind of frontend thread, read from /proc."""
    start = time.time()
    load = wrk.start(url, script, args.connections, 1, args.seconds, log)
    groups = {"frontend": [frontend], "workers": workers, "wrk": [psutil.Process(load.pid)]}
    before = {group: kernel_and_user(processes) for group, processes in groups.items() if group != "wrk"}
    threads_before = thread_cpu(frontend.pid)
    with GroupMeter(groups) as meter:
        load.wait(timeout=args.seconds + 60)
    threads = thread_groups(threads_before, thread_cpu(frontend.pid))
    after = {group: kernel_and_user(processes) for group, processes in groups.items() if group != "wrk"}
    measured = wrk.parse(log.read_text())
    cores = {group: busy for group, busy in (meter.cores(start + 1, start + args.seconds - 1) or {}).items()
             if group in (*groups, "other")}
    answers_per_s, answers = measured["requests_per_s"], max(measured["requests"], 1)
    return {
        "answers_per_s": answers_per_s, "latency_ms": measured["latency_ms"],
        "non_2xx": measured["non_2xx"] + measured["socket_errors"], "cores": cores,
        "cpu_ms_per_answer": {group: round(1000 * busy / answers_per_s, 2) for group, busy in cores.items()},
        "frontend_threads_ms_per_answer": {name: round(1000 * seconds / answers, 3)
                                           for name, seconds in threads.most_common(TOP) if seconds > 0},
        "kernel_percent": {group: round(100 * (after[group][0] - before[group][0])
                                        / max(sum(after[group]) - sum(before[group]), 1e-9), 1) for group in after},
    }


def profile(args: argparse.Namespace, pool: list[bytes]) -> dict[str, Any]:
    """Against a warm TorchServe as shipped: one window unprofiled, for the CPU per answer, then one with
    JFR and py-spy, for where it goes (starting JFR sets the JIT compiler to work again)."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    server = RunningTorchServe(parse_contender("torchserve"), args.model_store, args.output_dir / "torchserve",
                               args.port_base)
    try:
        processes = server.processes()
        (frontend,) = [p for p in processes if p.name() == "java"]
        workers = [p for p in processes if "model_service_worker" in " ".join(p.cmdline())]
        headers = {"Content-Type": "image/png"} | bearer(read_key_file(server.key_file)["inference"])
        script = wrk.write_script(pool, headers, args.output_dir / "wrk")
        warm = wrk.start(server.url, script, args.connections, 1, args.warm_up, args.output_dir / "warm-up.log")
        warm.wait(timeout=args.warm_up + 60)
        decoders = [child for worker in workers for child in worker.children(recursive=True)]
        unprofiled = measure_window(server.url, script, args, frontend, [*workers, *decoders],
                                    args.output_dir / "wrk-unprofiled.log")
        recording, stacks = args.output_dir / "frontend.jfr", args.output_dir / "workers"
        stacks.mkdir(exist_ok=True)
        jcmd = Path(java_home()) / "bin" / "jcmd"
        subprocess.run([str(jcmd), str(frontend.pid), "JFR.start", "name=profile", "settings=profile",
                        f"filename={recording}"], check=True, capture_output=True)
        spies = [subprocess.Popen([py_spy(), "record", "--pid", str(process.pid), "--duration", str(args.seconds),
                                   "--rate", "100", "--nonblocking", "--format", "raw",
                                   "--output", str(stacks / f"{process.pid}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                 for process in [*workers, *decoders]]
        profiled = measure_window(server.url, script, args, frontend, [*workers, *decoders], args.output_dir / "wrk.log")
        subprocess.run([str(jcmd), str(frontend.pid), "JFR.stop", "name=profile"], check=True, capture_output=True)
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        server.stop()
    worker_samples = [sample for path in sorted(stacks.glob("*.txt")) for sample in python_samples(path)]
    return {
        "unprofiled": unprofiled, "profiled": profiled,
        "frontend": summarise([(frames, 1) for frames in jvm_samples(recording)], JVM_PARTS),
        "workers": summarise(worker_samples, PYTHON_PARTS),
        "processes": {"frontend": 1, "workers": len(workers), "decoders": len(decoders)},
    }


def markdown(report: dict[str, Any]) -> str:
    result = report["result"]
    windows = {"unprofiled": result["unprofiled"], "profiled": result["profiled"]}
    groups = list(dict.fromkeys(group for window in windows.values() for group in window["cores"]))
    threads = list(dict.fromkeys(name for window in windows.values() for name in window["frontend_threads_ms_per_answer"]))

    def cell(window: dict[str, Any], key: str, name: str, suffix: str = "") -> str:
        value = window[key].get(name)
        return "n/a" if value is None else f"{value}{suffix}"

    lines = [
        "# Where TorchServe's CPU goes per answer",
        "",
        (f"Generated by `{report['command']}` on {report['date']}; the raw data is in "
         f"[{report['name']}.json]({report['name']}.json). Do not edit by hand: rerun the command."),
        "",
        (f"**Machine:** {machine_line(report['machine'])}. TorchServe as shipped ({result['processes']['workers']} worker "
         f"processes across its archives, {result['processes']['decoders']} decoder processes), wrk with "
         f"{report['connections']} connections, {report['warm_up_s']} s of warm-up, then two windows of {report['seconds']} s: "
         "the first unprofiled, the second with JFR on the frontend and py-spy on the workers (the profilers' own CPU "
         "shows as \"other\")."),
        "",
        "| | unprofiled | profiled |",
        "|---|---|---|",
        "| answers/s | " + " | ".join(f"{w['answers_per_s']:.0f}" for w in windows.values()) + " |",
        "| p99 ms | " + " | ".join(f"{w['latency_ms'].get('p99')}" for w in windows.values()) + " |",
        "| non-2xx | " + " | ".join(f"{w['non_2xx']}" for w in windows.values()) + " |",
        "",
        "| process group | cores busy | CPU ms per answer | of which in the kernel | cores busy, profiled | CPU ms per answer, profiled |",
        "|---|---|---|---|---|---|",
        *(f"| {group} | {cell(windows['unprofiled'], 'cores', group)} | {cell(windows['unprofiled'], 'cpu_ms_per_answer', group)} | "
          f"{cell(windows['unprofiled'], 'kernel_percent', group, '%')} | {cell(windows['profiled'], 'cores', group)} | "
          f"{cell(windows['profiled'], 'cpu_ms_per_answer', group)} |" for group in groups),
        "",
        "## Frontend threads (CPU time from /proc)",
        "",
        "| thread (numbers as #) | CPU ms per answer | profiled |",
        "|---|---|---|",
        *(f"| `{name}` | {cell(windows['unprofiled'], 'frontend_threads_ms_per_answer', name)} | "
          f"{cell(windows['profiled'], 'frontend_threads_ms_per_answer', name)} |" for name in threads),
        "",
    ]
    for side, title in (("frontend", "Frontend (JVM, JFR execution samples, profiled window)"),
                        ("workers", "Workers (Python, py-spy samples, decoders included, profiled window)")):
        summary = result[side]
        lines += [f"## {title}", "", f"{summary['samples']} samples.", "", "| part of the request path | % of samples |",
                  "|---|---|", *(f"| {name} | {share} |" for name, share in summary["parts"].items()), "",
                  "| most often on CPU (self) | % |", "|---|---|",
                  *(f"| `{row['frame'][:110]}` | {row['percent']} |" for row in summary["top_self"]), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_data_dir(parser, args.data_dir)
    if not wrk.available():
        parser.error("wrk not found: install it (apt-get install wrk)")
    if py_spy() is None:
        parser.error("py-spy not found: pip install -e '.[bench]'")
    pool = list(test_images(args.data_dir, args.image_pool)[0])
    report = {"name": args.report_name, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine(), "command": shlex.join(["python", "-m", "loadtest", "profile", *argv]),
              "seconds": args.seconds, "warm_up_s": args.warm_up, "connections": args.connections}
    report["result"] = profile(args, pool)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.docs_dir / f"{args.report_name}.json", report)
    (args.docs_dir / f"{args.report_name.upper()}.md").write_text(markdown(report))
    print(json.dumps({window: report["result"][window]["cpu_ms_per_answer"] for window in ("unprofiled", "profiled")}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
