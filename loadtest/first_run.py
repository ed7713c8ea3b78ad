"""Fresh clone to first prediction, timed: ``python -m loadtest first-run`` (``make first-run``).

What a newcomer waits for: ``git clone`` of this repository's HEAD into a scratch directory, then the
README's ``make serve`` with no virtual environment and no model store (its three stages timed on
their own: ``make venv``, ``make model-store``, then ``make serve``, which finds both and starts
TorchServe), then one REST prediction of a CIFAR-10 test image with the key from ``key_file.json``,
checked against the image's true label. The clone is stopped and removed afterwards. The result goes
to docs/first_run.json and docs/FIRST_RUN.md; the target is 300 s (issue 10).

It serves on the shipped ports (8080-8083, 7070-7071): stop any other server first. pip's cache is
left as it is; the report says whether one existed, since a warm cache shortens ``make venv``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from clients.tokens import bearer, read_key_file
from loadtest.images import test_images, true_labels
from loadtest.report import machine, machine_line, write_json
from server.config import REPO_ROOT
from training.data import default_data_dir

TARGET_SECONDS = 300.0
STAGES = (("clone", None), ("make venv", "venv"), ("make model-store", "model-store"), ("make serve", "serve"))
PREDICTION_URL = "http://127.0.0.1:8080/predictions/cifar10"


def pip_cache() -> dict[str, Any]:
    """Whether pip had a cache to install from (a fresh machine has none)."""
    result = subprocess.run(["python3", "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    directory = Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None
    size = (sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
            if directory and directory.is_dir() else 0)
    return {"directory": str(directory) if directory else None, "mib": round(size / 2**20, 1)}


def run_stage(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> float:
    """Seconds ``command`` took; its output goes to ``log``. A failing stage ends the run."""
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        result = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed with exit status {result.returncode}; see {log}")
    return time.perf_counter() - started


def first_prediction(clone: Path, data_dir: str) -> dict[str, Any]:
    """One prediction of test image 0 with the freshly written inference key; its label against the truth."""
    images, _ = test_images(data_dir, 1)
    key = read_key_file(clone / "key_file.json")["inference"]
    response = requests.post(PREDICTION_URL, data=images[0], timeout=60,
                             headers=bearer(key) | {"Content-Type": "image/png"})
    label, truth = response.json().get("label") if response.ok else None, true_labels(data_dir, 1)[0]
    return {"status": response.status_code, "label": label, "true_label": truth, "correct": label == truth}


def measure(repo: Path, data_dir: str, workdir: Path, log: Path) -> dict[str, Any]:
    clone = workdir / "clone"
    # As a newcomer's shell would be: no active venv, and no variables of an enclosing `make first-run`
    # (MAKEFLAGS carries its command-line CIFAR10_ROOT, relative to this checkout, into every make below).
    env = {name: value for name, value in os.environ.items()
           if name not in ("VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["CIFAR10_ROOT"] = str(Path(data_dir).resolve())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for stage, target in STAGES:
            command = ["git", "clone", "--quiet", str(repo), str(clone)] if target is None else ["make", target]
            seconds[stage] = run_stage(command, workdir if target is None else clone, log, env)
        prediction_started = time.perf_counter()
        prediction = first_prediction(clone, data_dir)
        seconds["first prediction"] = time.perf_counter() - prediction_started
        total = time.perf_counter() - started
    finally:
        if (clone / "Makefile").exists():
            subprocess.run(["make", "stop"], cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return {"commit": commit, "seconds": {stage: round(value, 1) for stage, value in seconds.items()},
            "total_seconds": round(total, 1), "prediction": prediction, "target_seconds": TARGET_SECONDS,
            "met": total <= TARGET_SECONDS and prediction["correct"]}


def first_run_markdown(report: dict[str, Any]) -> str:
    rows = [f"| {stage} | {value:.1f} |" for stage, value in report["seconds"].items()]
    prediction = report["prediction"]
    verdict = "met" if report["met"] else "not met"
    cache = report["pip_cache"]
    return "\n".join([
        "# Fresh clone to first prediction",
        "",
        f"Generated by `{report['command']}` on {report['date']} (commit `{report['commit'][:12]}`); the raw data is "
        "in [first_run.json](first_run.json). Do not edit by hand: rerun the command.",
        "",
        f"**Machine:** {machine_line(report['machine'])}. pip cache before the run: "
        f"{cache['mib']} MiB{' (none)' if not cache['mib'] else ''}.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *rows,
        f"| **total** | **{report['total_seconds']:.1f}** |",
        "",
        f"First answer: HTTP {prediction['status']}, label `{prediction['label']}` for an image whose true label is "
        f"`{prediction['true_label']}`. Target: a correct first prediction within {report['target_seconds']:.0f} s: "
        f"**{verdict}**.",
        "",
        "The stages are the README's `make serve` split into its parts (`make venv`, `make model-store`, then "
        "`make serve`, which finds both and starts TorchServe); what each does: [README](../README.md#quick-start).",
        "",
    ])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest first-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository cloned (default: this one)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--log", type=Path, default=REPO_ROOT / "build" / "first-run.log")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    report = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "pip_cache": pip_cache(), "command": shlex.join(["python", "-m", "loadtest", "first-run", *argv])}
    workdir = Path(tempfile.mkdtemp(prefix="first-run-"))
    try:
        report |= measure(args.repo, args.data_dir, workdir, args.log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.docs_dir / "first_run.json", report)
    (args.docs_dir / "FIRST_RUN.md").write_text(first_run_markdown(report))
    print(first_run_markdown(report))
    return 0 if report["met"] else 1
