"""Start, probe and stop a real TorchServe, and read its access tokens.

Used by the tests and the load tester, so that both run the server exactly as the README does:
``torchserve --start --ts-config config.properties --ncs`` from a working directory, which is where
TorchServe writes ``key_file.json`` and its logs. Each instance gets its own TMPDIR, because
TorchServe keeps its pid file in the temp directory and would otherwise refuse to start beside
another instance (or stop the wrong one).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from clients.management import Management
from clients.tokens import KeyRing, Kind, read_key_file
from server.config import (
    REPO_ROOT,
    SHIPPED_CONFIG,
    anchored_vmargs,
    read_properties,
    render_properties,
    store_only_urls,
)
from server.health import DEFAULT_BIND as DEFAULT_HEALTH_BIND
from server.health import requests_status
from server.java import java_home
from server.plan import DEFAULT_MODEL, THREADS_ENV, WORKERS_ENV, ServingPlan, plan_from_environment
from server.processes import family, stop_processes
from server.scaler import scale_to_plan

HEALTH_PID_FILE = "health.pid"


@dataclass
class TorchServe:
    """One TorchServe instance run from ``workdir`` with the shipped config plus ``overrides``.

    ``overrides`` replace single properties (ports, model_store, load_models ...); everything else,
    token authorization included, is the shipped production config. With ``enable_model_api``,
    ``allowed_urls`` confines registration to the model store unless an override says otherwise.
    ``isolated`` gives the instance its own TMPDIR (tests, sweeps); without it, a plain
    ``torchserve --stop`` finds and stops it.
    ``plan`` (server.plan) sets the workers of each model once it is loaded and the threads of
    every worker; without it the archives' model-config.yaml decides both.
    """

    workdir: Path
    model_store: Path
    overrides: dict[str, str] = field(default_factory=dict)
    enable_model_api: bool = False
    config: Path = SHIPPED_CONFIG
    isolated: bool = True
    plan: ServingPlan | None = None
    process: psutil.Process | None = None
    _key_ring: KeyRing | None = field(default=None, init=False, repr=False)
    _management: Management | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        store = {"model_store": str(self.model_store)}
        if self.enable_model_api:
            store["allowed_urls"] = store_only_urls(self.model_store)
        self.properties = read_properties(self.config) | store | self.overrides
        if "vmargs" in self.properties:
            self.properties["vmargs"] = anchored_vmargs(self.properties["vmargs"], self.config.resolve().parent)

    @property
    def inference_url(self) -> str:
        return self.properties["inference_address"]

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.properties["metrics_address"]

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.properties['grpc_inference_address']}:{self.properties['grpc_inference_port']}"

    @property
    def grpc_management_target(self) -> str:
        return f"{self.properties['grpc_management_address']}:{self.properties['grpc_management_port']}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def keys(self) -> dict[str, str]:
        """The keys in key_file.json now (they change when a client renews an expired one)."""
        return read_key_file(self.key_file)

    @property
    def key_ring(self) -> KeyRing:
        """This instance's keys, renewed through the token API when TorchServe refuses them."""
        if self._key_ring is None:
            self._key_ring = KeyRing(self.key_file, self.management_url)
        return self._key_ring

    def call(self, kind: Kind, method: str, url: str, **kwargs) -> requests.Response:
        """An HTTP call with the ``kind`` key that survives the key's expiry (see clients.tokens)."""
        return self.key_ring.request(kind, method, url, **kwargs)

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp" if self.isolated else Path(tempfile.gettempdir())

    def _env(self) -> dict[str, str]:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"JAVA_HOME": java_home(), "TMPDIR": str(self.tmpdir), "LOG_LOCATION": str(self.workdir / "logs"),
                            "METRICS_LOCATION": str(self.workdir / "logs")}
        if self.plan is not None:  # the frontend passes its environment on to every worker it starts
            env[THREADS_ENV] = str(self.plan.threads)
        return env

    def torchserve_cli(self, *args: str) -> str:
        """Run the torchserve CLI; its output goes to a file because the frontend it starts inherits it."""
        executable = Path(sys.executable).with_name("torchserve")
        console = self.workdir / "logs" / "torchserve_cli.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        with open(console, "a") as out:
            result = subprocess.run([str(executable), *args], cwd=self.workdir, env=self._env(),
                                    stdout=out, stderr=subprocess.STDOUT, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"torchserve {' '.join(args)} failed: {console.read_text()[-2000:]}")
        return console.read_text()

    def start(self, wait_for: list[str] | None = None, timeout: float = 240.0) -> "TorchServe":
        """Start the server and wait until it answers and the named models have a ready worker."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.effective_config
        config.write_text(render_properties(self.properties))
        args = ["--start", "--ts-config", str(config), "--ncs"]
        if self.enable_model_api:
            args.append("--enable-model-api")
        self._key_ring = self._management = None  # a new start writes new keys
        self.torchserve_cli(*args)
        pid_file = self.tmpdir / ".model_server.pid"
        deadline = time.monotonic() + timeout
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.process = psutil.Process(int(pid_file.read_text().split()[0]))
        try:
            self._wait_ready(wait_for or [], deadline)
            if self.plan is not None:
                self.apply_plan(self.plan, timeout=max(10.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def apply_plan(self, plan: ServingPlan, timeout: float) -> None:
        """Scale every loaded model to its planned workers (server.scaler)."""
        scale_to_plan(self.management, plan, timeout)

    @property
    def management(self) -> Management:
        """This instance's management API (clients.management), sharing its key ring."""
        if self._management is None:
            self._management = Management(self.key_file, self.management_url, keys=self.key_ring)
        return self._management

    def models(self) -> list[str]:
        return self.management.models()

    def _wait_ready(self, models: list[str], deadline: float) -> None:
        pending = ["ping", *models]
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"TorchServe not ready, still waiting for {pending}; see {self.workdir / 'logs'}")
            if self.process is not None and not self.process.is_running():
                raise RuntimeError(f"TorchServe exited during start-up; see {self.workdir / 'logs'}")
            try:
                if pending[0] == "ping":
                    ok = self.call("inference", "GET", f"{self.inference_url}/ping", timeout=2).ok
                else:
                    ok = self.ready_workers(pending[0]) > 0
            except (requests.RequestException, OSError, ValueError, KeyError):  # key file not (fully) written yet
                ok = False
            if ok:
                pending.pop(0)
            else:
                time.sleep(0.5)

    def describe(self, model: str) -> dict:
        return self.management.describe(model)[0]

    def ready_workers(self, model: str) -> int:
        return self.management.ready_workers(model)

    def processes(self) -> list[psutil.Process]:
        """The frontend and every process it started (the Python workers)."""
        return family(self.process) if self.process is not None else []

    @property
    def effective_config(self) -> Path:
        return self.workdir / "logs" / "effective-config.properties"

    def start_health(self, bind: str = DEFAULT_HEALTH_BIND, timeout: float = 30.0) -> str:
        """Start the secret-free /live and /ready server (server.health) for this instance; its URL.

        Detached like TorchServe itself, so that it outlives the command that started it; its pid goes
        beside the logs so that :meth:`stop_health` (and ``python -m server stop``) finds it.
        """
        self.stop_health()
        logs = self.workdir / "logs"
        with open(logs / "health.log", "a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "server.health", "serve", "--bind", bind, "--workdir", str(self.workdir),
                 "--config", str(self.effective_config)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (logs / HEALTH_PID_FILE).write_text(str(process.pid))
        url = f"http://{bind}"
        deadline = time.monotonic() + timeout
        while requests_status(f"{url}/live") is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"health server did not start; see {logs / 'health.log'}")
            time.sleep(0.2)
        return url

    def stop_health(self) -> None:
        pid_file = self.workdir / "logs" / HEALTH_PID_FILE
        if not pid_file.exists():
            return
        try:
            process = psutil.Process(int(pid_file.read_text()))
            if "server.health" in process.cmdline():  # not a recycled pid
                stop_processes([process], grace=10)
        except (psutil.NoSuchProcess, ValueError):
            pass
        pid_file.unlink(missing_ok=True)

    def stop(self, timeout: float = 60.0) -> None:
        """``torchserve --stop``, then make sure no process of this instance is left behind."""
        self.stop_health()
        processes = self.processes()
        self.torchserve_cli("--stop")
        stop_processes(processes, grace=timeout, terminate=False)
        self.process = None

    def log_text(self, name: str = "model_log.log") -> str:
        path = self.workdir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "TorchServe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """``python -m server start|stop``: the production server, run from the current directory."""
    parser = argparse.ArgumentParser(prog="python -m server", description=main.__doc__)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--enable-model-api", action="store_true", help="allow register/unregister (off in production)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--health-bind", default=DEFAULT_HEALTH_BIND,
                        help="host:port of the secret-free /live and /ready checks (default: %(default)s)")
    parser.add_argument("--workers", type=int, help=f"worker processes of {DEFAULT_MODEL} (default: ${WORKERS_ENV} "
                        "or one per core, see docs/SERVING.md)")
    parser.add_argument("--threads", type=int, help=f"threads per worker (default: ${THREADS_ENV} or cores / workers)")
    args = parser.parse_args()
    serving_plan = plan_from_environment(args.workers, args.threads) if args.action == "start" else None
    server = TorchServe(workdir=Path.cwd(), model_store=args.model_store, enable_model_api=args.enable_model_api,
                        isolated=False, plan=serving_plan)
    if args.action == "stop":
        server.stop_health()
        server.torchserve_cli("--stop")
        return
    models = sorted(path.stem for path in args.model_store.glob("*.mar"))
    server.start(wait_for=models, timeout=args.timeout)
    health = server.start_health(args.health_bind)
    print(f"Workers: {serving_plan.describe()}.")
    print(f"TorchServe is serving {', '.join(models)}: REST {server.inference_url}, management {server.management_url}, "
          f"metrics {server.metrics_url}/metrics, gRPC {server.grpc_inference_target} / {server.grpc_management_target}, "
          f"health {health}/live and {health}/ready. Tokens: {server.workdir / 'key_file.json'}. "
          "Stop it with: make stop (or python -m server stop)")

