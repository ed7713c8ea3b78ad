"""The servers of the peer benchmark: TorchServe as shipped (or with one setting changed) and the peers.

A contender is written ``kind`` or ``kind:key=value,key=value`` on the command line, e.g.
``torchserve``, ``torchserve:workers=1,threads=2``, ``litserve:batch=16,delay=10``, ``fastapi:processes=1``.
Each is started alone, answers on ``/predictions/cifar10``, and is stopped with all its processes.
The shipped TorchServe and every peer run the same inference processes x threads (``same_inference``);
each peer's processes register when they load the handler, and a peer that runs another count is refused.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
import requests

from loadtest.archive import read_archive
from loadtest.peers.common import ROUTE
from server.config import REPO_ROOT, free_port_overrides
from server.launcher import TorchServe
from server.plan import DEFAULT_MODEL, plan_from_environment
from server.processes import family, stop_processes

SHIPPED = "torchserve"  # the contender that is the product; every other torchserve:... is an experiment
PEER_MODULES = {"fastapi": "loadtest.peers.fastapi_workers", "litserve": "loadtest.peers.litserve_batched",
                "rayserve": "loadtest.peers.rayserve_batched", "bentoml": "loadtest.peers.bentoml_batched"}
PEER_OPTIONS = {"processes": "--processes", "threads": "--threads", "batch": "--batch-size", "delay": "--batch-delay-ms"}
# What each peer can be told: FastAPI has no batching; BentoML's adaptive batcher picks its own wait.
PEER_KEYS = {"fastapi": ("processes", "threads"), "litserve": tuple(PEER_OPTIONS), "rayserve": tuple(PEER_OPTIONS),
             "bentoml": ("processes", "threads", "batch")}
# TorchServe settings a contender may change; the rest of the shipped config stays as it is. ``micro``
# (micro-batch size) and ``async`` (1) swap in an experiment entry point (loadtest/experiments/).
TS_OPTIONS = ("workers", "threads", "batch", "delay", "netty", "netty_client", "micro", "async")
READY_TIMEOUT_S = 300


@dataclass(frozen=True)
class Contender:
    kind: str
    options: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")

    @property
    def judged(self) -> bool:
        """The shipped TorchServe and the peers are judged against each other; TorchServe experiments are not."""
        return self.kind != "torchserve" or self.name == SHIPPED

    def inference(self) -> tuple[int, int]:
        """Inference processes x intra-op threads this contender will run: the serve-time plan unless set."""
        if self.kind == "torchserve":
            plan = plan_from_environment(self.options.get("workers"), self.options.get("threads"))
        else:
            plan = plan_from_environment(self.options.get("processes"), self.options.get("threads"))
        return plan.default_workers, plan.threads


def allowed_options(kind: str) -> tuple[str, ...] | None:
    if kind == "torchserve":
        return TS_OPTIONS
    return PEER_KEYS.get(kind)


def parse_contender(text: str) -> Contender:
    """``kind[:key=value,...]`` with integer values; unknown kinds and keys are refused."""
    kind, _, rest = text.partition(":")
    allowed = allowed_options(kind)
    if allowed is None:
        raise ValueError(f"unknown server {kind!r}: expected torchserve or one of {', '.join(PEER_MODULES)}")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        if key not in allowed or not value.isdigit():
            raise ValueError(f"{text!r}: {kind} takes {', '.join(allowed)} as key=integer")
        options[key] = int(value)
    return Contender(kind, options)


def same_inference(contenders: list[Contender]) -> None:
    """Refuse a comparison in which the judged contenders would run different inference processes x threads."""
    shapes = {contender.name: contender.inference() for contender in contenders if contender.judged}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {processes}x{threads}" for name, (processes, threads) in shapes.items())
        raise ValueError(f"the shipped TorchServe and the peers must run the same inference processes x threads: {listed}")


class Running(Protocol):
    url: str
    key_file: Path | None
    settings: dict
    inference: dict[str, int]  # inference processes and intra-op threads, as counted once it was ready

    def processes(self) -> list[psutil.Process]: ...

    def stop(self) -> None: ...


class RunningTorchServe:
    """The shipped deployment (config.properties, every archive, the serve-time plan), or one setting changed:
    batch size and delay need the archive registered with them, as TorchServe takes them from the
    archive otherwise."""

    def __init__(self, contender: Contender, model_store: Path, workdir: Path, port_base: int) -> None:
        options = contender.options
        if "micro" in options or "async" in options:
            model_store = self._experiment_store(options, model_store, workdir / "experiment")
        plan = plan_from_environment(options.get("workers"), options.get("threads"))
        overrides = free_port_overrides(port_base)
        if "netty" in options:
            overrides["number_of_netty_threads"] = str(options["netty"])
        if "netty_client" in options:
            overrides["netty_client_threads"] = str(options["netty_client"])
        register = "batch" in options or "delay" in options
        if register:
            overrides["load_models"] = ""
        self.server = TorchServe(workdir=workdir, model_store=model_store, overrides=overrides,
                                 enable_model_api=register, plan=plan)
        self.server.start(wait_for=[] if register else sorted(path.stem for path in model_store.glob("*.mar")),
                          timeout=READY_TIMEOUT_S)
        if register:
            self._register(options.get("batch"), options.get("delay"), plan.default_workers)
            self.server.apply_plan(plan, timeout=READY_TIMEOUT_S)  # the archive's minWorkers beat initial_workers
        self.url = self.server.inference_url
        self.key_file = self.server.workdir / "key_file.json"
        described = self.server.describe(DEFAULT_MODEL)
        self.inference = {"processes": len(described["workers"]), "threads": plan.threads}
        self.settings = {"workers": len(described["workers"]), "threads": plan.threads,
                         "batch_size": described["batchSize"], "max_batch_delay_ms": described["maxBatchDelay"],
                         "cores": plan.cores, **{k: v for k, v in options.items() if k.startswith("netty")}}

    @staticmethod
    def _experiment_store(options: dict[str, int], model_store: Path, workdir: Path) -> Path:
        from loadtest.experiments.archive import experiment_store

        shipped = model_store / f"{DEFAULT_MODEL}.mar"
        if "micro" in options:
            return experiment_store(shipped, "micro_batching", {"micro_batching": {"micro_batch_size": options["micro"]}},
                                    workdir)
        return experiment_store(shipped, "async", {"asyncCommunication": bool(options["async"])}, workdir)

    def _register(self, batch: int | None, delay: int | None, workers: int) -> None:
        params = {"url": f"{DEFAULT_MODEL}.mar", "model_name": DEFAULT_MODEL, "initial_workers": workers,
                  "synchronous": "true"}
        params |= {"batch_size": batch} if batch else {}
        params |= {"max_batch_delay": delay} if delay is not None else {}
        response = self.server.call("management", "POST", f"{self.server.management_url}/models", params=params,
                                    timeout=READY_TIMEOUT_S)
        response.raise_for_status()

    def processes(self) -> list[psutil.Process]:
        return self.server.processes()

    def stop(self) -> None:
        self.server.stop()


class RunningPeer:
    """``python -m loadtest.peers.<module>`` in its own process group, ready once it classifies a PNG and
    all of its inference processes have loaded the handler; batching peers batch as the archive says
    TorchServe batches unless told otherwise."""

    def __init__(self, contender: Contender, archive: Path, port: int, workdir: Path, probe: bytes) -> None:
        processes, threads = contender.inference()
        model_config = read_archive(archive).model_config
        archive_batching = {"batch": int(model_config.get("batchSize", 1)), "delay": int(model_config.get("maxBatchDelay", 0))}
        defaults = {"processes": processes, "threads": threads} | {key: value for key, value in archive_batching.items()
                                                                   if key in PEER_KEYS[contender.kind]}
        options = defaults | contender.options
        self.registry = workdir / "inference"
        command = [sys.executable, "-m", PEER_MODULES[contender.kind], "--archive", str(archive), "--port", str(port),
                   "--registry", str(self.registry)]
        for key, value in options.items():
            command += [PEER_OPTIONS[key], str(value)]
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "peer.log"
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.root = psutil.Process(self.process.pid)
        self.url, self.key_file, self.settings = f"http://127.0.0.1:{port}", None, options
        try:
            self._wait_ready(probe, log)
            self.inference = self._wait_inference(processes, threads)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, probe: bytes, log: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peer exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                if requests.post(self.url + ROUTE, data=probe, headers={"Content-Type": "image/png"}, timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"peer not ready after {READY_TIMEOUT_S} s; see {log}")

    def _wait_inference(self, processes: int, threads: int) -> dict[str, int]:
        """The inference processes x threads the peer really runs, once all of its processes have registered;
        a peer that runs more processes, or other threads, than it was given is refused."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            found = inference_processes(self.registry, self.processes())
            counts = {"processes": len(found), "threads": max(found.values(), default=0)}
            if len(found) > processes or any(value != threads for value in found.values()):
                raise RuntimeError(f"peer runs {sorted(found.values())} thread(s) in {len(found)} inference process(es), "
                                   f"not {processes} x {threads}")
            if len(found) == processes or time.monotonic() > deadline:
                if len(found) != processes:
                    raise TimeoutError(f"only {len(found)} of {processes} inference processes registered")
                return counts
            time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        return family(self.root)

    def stop(self) -> None:
        stop_processes(self.processes())


def inference_processes(registry: Path, alive: list[psutil.Process]) -> dict[int, int]:
    """Intra-op threads by pid of the registered inference processes that are among ``alive``."""
    pids = {process.pid for process in alive}
    records = (json.loads(path.read_text()) for path in registry.glob("*.json")) if registry.is_dir() else ()
    return {record["pid"]: record["threads"] for record in records if record["pid"] in pids}
