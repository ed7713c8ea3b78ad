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
from typing import Any

import psutil
import requests

from handlers.health import DEFAULT_BIND as DEFAULT_HEALTH_BIND
from handlers.health import management_json, model_names, ready_workers, requests_status
from handlers.resources import DEFAULT_MODEL, THREADS_ENV, WORKERS_ENV, ServingPlan, plan_from_environment
from handlers.scaler import scale_to_plan
from handlers.tokens import KeyRing, Kind, read_key_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# The config this installation serves with: the checkout's config.properties, or in the container image
# (where the project is installed into a venv, without the checkout) the effective one it names in TS_CONFIG.
SHIPPED_CONFIG = Path(os.environ.get("TS_CONFIG") or REPO_ROOT / "config.properties")
LOG_CONFIG_FLAG = "-Dlog4j.configurationFile="
HEALTH_PID_FILE = "health.pid"


def store_only_urls(model_store: Path) -> str:
    """``allowed_urls`` (TorchServe: comma-separated Java regexes) matching only archives in ``model_store``.

    TorchServe's default, ``file://.*|http(s)?://.*``, lets any holder of the management key make the
    server download and run an archive from anywhere (CVE-2023-43654). Archives registered by name
    (``url=cifar10.mar``) are read from the model store and are not URLs, so they stay allowed.
    """
    store = str(model_store)
    if "," in store or "\\E" in store:
        raise ValueError(f"model store path {store!r} cannot be quoted in allowed_urls")
    return f"file://\\Q{store}\\E/[^/]+\\.mar"


def parse_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def anchored_vmargs(vmargs: str, base: Path) -> str:
    """``vmargs`` with a relative log4j configuration made absolute against ``base`` (the config's directory).

    The shipped config names log4j2.xml relative to the repository root, where the README starts the
    server; an instance started from another working directory must still find it, or the JVM would
    silently fall back to TorchServe's per-request DEBUG logging.
    """
    words = vmargs.split()
    for i, word in enumerate(words):
        if word.startswith(LOG_CONFIG_FLAG) and not Path(word.removeprefix(LOG_CONFIG_FLAG)).is_absolute():
            words[i] = LOG_CONFIG_FLAG + str(base / word.removeprefix(LOG_CONFIG_FLAG))
    return " ".join(words)


@dataclass
class TorchServe:
    """One TorchServe instance run from ``workdir`` with the shipped config plus ``overrides``.

    ``overrides`` replace single properties (ports, model_store, load_models ...); everything else,
    token authorization included, is the shipped production config. With ``enable_model_api``,
    ``allowed_urls`` confines registration to the model store unless an override says otherwise.
    ``isolated`` gives the instance its own TMPDIR (tests, sweeps); without it, a plain
    ``torchserve --stop`` finds and stops it.
    ``plan`` (handlers.resources) sets the workers of each model once it is loaded and the threads of
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

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        store = {"model_store": str(self.model_store)}
        if self.enable_model_api:
            store["allowed_urls"] = store_only_urls(self.model_store)
        self.properties = parse_properties(self.config.read_text()) | store | self.overrides
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
        """An HTTP call with the ``kind`` key that survives the key's expiry (see handlers.tokens)."""
        return self.key_ring.request(kind, method, url, **kwargs)

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp" if self.isolated else Path(tempfile.gettempdir())

    def _env(self) -> dict[str, str]:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"TMPDIR": str(self.tmpdir), "LOG_LOCATION": str(self.workdir / "logs"),
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
        # java.util.Properties reads a backslash as an escape: double it (allowed_urls' regex has some).
        config.write_text("".join(f"{k}={v}".replace("\\", "\\\\") + "\n" for k, v in self.properties.items()))
        args = ["--start", "--ts-config", str(config), "--ncs"]
        if self.enable_model_api:
            args.append("--enable-model-api")
        self._key_ring = None  # a new start writes new keys
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
        """Scale every loaded model to its planned workers (handlers.scaler)."""
        scale_to_plan(self.key_ring, self.management_url, plan, timeout)

    def _management_json(self, path: str, **params: Any) -> Any:
        return management_json(self.key_ring, self.management_url, path, 10, **params)

    def models(self) -> list[str]:
        return model_names(self._management_json)

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
        return self._management_json(f"/models/{model}")[0]

    def ready_workers(self, model: str) -> int:
        return ready_workers(self.describe(model))

    def processes(self) -> list[psutil.Process]:
        """The frontend and every process it started (the Python workers)."""
        if self.process is None or not self.process.is_running():
            return []
        return [self.process, *self.process.children(recursive=True)]

    @property
    def effective_config(self) -> Path:
        return self.workdir / "logs" / "effective-config.properties"

    def start_health(self, bind: str = DEFAULT_HEALTH_BIND, timeout: float = 30.0) -> str:
        """Start the secret-free /live and /ready server (handlers.health) for this instance; its URL.

        Detached like TorchServe itself, so that it outlives the command that started it; its pid goes
        beside the logs so that :meth:`stop_health` (and ``python -m handlers.server stop``) finds it.
        """
        self.stop_health()
        logs = self.workdir / "logs"
        with open(logs / "health.log", "a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "handlers.health", "serve", "--bind", bind, "--workdir", str(self.workdir),
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
            if "handlers.health" in process.cmdline():  # not a recycled pid
                process.terminate()
                process.wait(timeout=10)
        except (psutil.NoSuchProcess, ValueError):
            pass
        pid_file.unlink(missing_ok=True)

    def stop(self, timeout: float = 60.0) -> None:
        """``torchserve --stop``, then make sure no process of this instance is left behind."""
        self.stop_health()
        family = self.processes()
        self.torchserve_cli("--stop")
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)
        self.process = None

    def log_text(self, name: str = "model_log.log") -> str:
        path = self.workdir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "TorchServe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port_overrides(base: int) -> dict[str, str]:
    """Ports base..base+4 on loopback for a second instance beside the default one."""
    return {
        "inference_address": f"http://127.0.0.1:{base}",
        "management_address": f"http://127.0.0.1:{base + 1}",
        "metrics_address": f"http://127.0.0.1:{base + 2}",
        "grpc_inference_port": str(base + 3),
        "grpc_management_port": str(base + 4),
    }


def main() -> None:
    """``python -m handlers.server start|stop``: the production server, run from the current directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
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
          "Stop it with: make stop (or python -m handlers.server stop)")


if __name__ == "__main__":
    main()
