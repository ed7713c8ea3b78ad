"""The container recipe and the Kubernetes manifests, checked without Docker or a cluster.

Lint (hadolint) and schema validation (kubernetes-validate, strict) catch malformed files; the
cross-checks catch well-formed files that point at nothing: a probe on a path the health server
does not answer, a port the image's config does not listen on, an env var the entrypoint does not
read, an autoscaler on a metric TorchServe does not export. The image itself is run by
tests/test_image.py (`make image-test`).
"""
from __future__ import annotations

import copy
import fnmatch
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from server.config import REPO_ROOT, parse_properties
from server.health import PROBE_TIMEOUT, Health, handler_for
from server.plan import GIB, plan

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor still in common managed offerings; schemas ship offline


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


class Image:
    """What the Dockerfile's final stage declares: ports, user, environment, entrypoint, health check."""

    def __init__(self, text: str) -> None:
        stages: list[list[tuple[str, str]]] = []
        for word, rest in dockerfile_instructions(text):
            if word == "FROM":
                stages.append([])
            if stages:
                stages[-1].append((word, rest))
        self.all = [pair for stage in stages for pair in stage]
        self.final = stages[-1]
        self.ports = {int(p) for word, rest in self.final if word == "EXPOSE" for p in rest.split()}
        self.user = next(rest for word, rest in reversed(self.final) if word == "USER")
        self.env: dict[str, str] = {}
        for word, rest in self.final:
            if word == "ENV":
                self.env |= dict(pair.split("=", 1) for pair in shlex.split(rest))
        self.entrypoint = yaml.safe_load(next(rest for word, rest in self.final if word == "ENTRYPOINT"))
        healthcheck = next(rest for word, rest in self.final if word == "HEALTHCHECK")
        self.healthcheck = yaml.safe_load(healthcheck.split(" CMD ", 1)[1])

    def copied_to_app(self) -> dict[str, Path]:
        """Files the final stage copies from the build context, by their path in the image."""
        files = {}
        for word, rest in self.final:
            if word == "COPY" and not rest.startswith("--from"):
                *sources, target = rest.split()
                files |= {target.rstrip("/") + "/" + Path(src).name: REPO_ROOT / src for src in sources}
        return files


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def effective_config() -> dict[str, str]:
    """The image's config: the shipped config.properties, then the container overrides (last wins)."""
    return parse_properties((REPO_ROOT / "config.properties").read_text()
                            + "\n" + (DOCKER_DIR / "config.container.properties").read_text())


def kustomized(directory: Path) -> list[dict]:
    """The objects ``kubectl apply -k directory`` would apply (kubectl's built-in kustomize, offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize renders the CPU and GPU Deployments) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    """Every applied manifest by name; the Deployments as their kustomizations render them."""
    plain = {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
             for path in sorted(MANIFESTS.glob("*.yaml"))}
    return plain | {"torchserve.yaml": kustomized(MANIFESTS / "cpu"), "torchserve-gpu.yaml": kustomized(MANIFESTS / "gpu")}


def find(manifests: dict[str, list[dict]], file: str, kind: str, name: str | None = None) -> dict:
    return next(doc for doc in manifests[file] if doc["kind"] == kind and name in (None, doc["metadata"]["name"]))


def port_of(address: str) -> int:
    return urlparse(address if "//" in address else f"//{address}").port


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifests_match_the_kubernetes_schemas(manifests: dict[str, list[dict]]) -> None:
    assert set(manifests) >= {"torchserve.yaml", "torchserve-gpu.yaml", "hpa.yaml",
                              "prometheus-adapter-rules.yaml", "locust.yaml"}
    for name, docs in manifests.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}")


def test_container_config_keeps_torchserve_on_loopback_behind_the_proxy(
        image: Image, effective_config: dict[str, str]) -> None:
    """Only the proxy (client key required), metrics and health listen beyond loopback; TorchServe's own
    inference and management addresses stay inside the pod, token authorization on."""
    for key in ("inference_address", "management_address"):
        assert urlparse(effective_config[key]).hostname == "127.0.0.1", f"{key}={effective_config[key]}"
    assert urlparse(effective_config["metrics_address"]).hostname == "0.0.0.0"
    assert effective_config["grpc_inference_address"] == effective_config["grpc_management_address"] == "127.0.0.1"
    assert effective_config["disable_token_authorization"] == "false"
    # the rollout needs the model API (the entrypoint enables it); registration by name from the store only
    assert effective_config["allowed_urls"] == "(?!)"
    proxy = {int(image.env["PROXY_REST_PORT"]), int(image.env["PROXY_GRPC_PORT"])}
    inside = {port_of(effective_config["inference_address"]), int(effective_config["grpc_inference_port"])}
    assert not proxy & inside, "the proxy and TorchServe cannot share a port"
    listening = proxy | {port_of(effective_config["metrics_address"]), port_of(image.env["HEALTH_BIND"])}
    assert image.ports == listening  # EXPOSE names exactly what listens beyond loopback
    assert Path(effective_config["model_store"]).is_absolute()
    log_config = effective_config["vmargs"].split("-Dlog4j.configurationFile=", 1)[1].split()[0]
    assert log_config in image.copied_to_app(), "log4j2.xml must be where vmargs points"


def test_the_proxy_config_of_the_image_is_valid_haproxy(effective_config: dict[str, str], tmp_path: Path) -> None:
    from server.proxy import ProxySpec, prepare
    from server.supervisor import haproxy_executable

    try:
        haproxy = haproxy_executable()
    except FileNotFoundError:
        pytest.skip("Debian's haproxy is not installed")
    client_key, torchserve_key = secrets.token_urlsafe(16), secrets.token_urlsafe(6)
    keys = tmp_path / "accepted"
    keys.write_text(f"{client_key}\n")
    spec = ProxySpec("0.0.0.0", 8080, 7070, effective_config, keys, tmp_path)
    prepare(spec, torchserve_key)
    result = subprocess.run([haproxy, "-c", "-f", str(spec.config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert client_key not in spec.config.read_text() and torchserve_key not in spec.config.read_text()
    assert spec.map_file.stat().st_mode & 0o077 == 0  # TorchServe's key: owner only


def test_image_runs_as_non_root_and_starts_through_its_supervisor(image: Image, capsys: pytest.CaptureFixture) -> None:
    uid = image.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can verify it
    copied = image.copied_to_app()
    assert image.entrypoint[:2] == ["/usr/bin/tini", "--"], "tini signals the supervisor alone (no -g)"
    entrypoint = image.entrypoint[-1]
    assert entrypoint in copied and copied[entrypoint].stat().st_mode & 0o111, "entrypoint copied and executable"
    script = copied[entrypoint].read_text()
    assert "exec python -m server.supervisor" in script and "--enable-model-api" in script
    from server.supervisor import main as supervisor_main

    arguments = shlex.split(script.split("exec python -m server.supervisor", 1)[1].replace("\\\n", " "))
    with pytest.raises(SystemExit) as parsed:  # every option parses with the image's values; only the key file
        supervisor_main([image.env[a.strip("${}")] if a.startswith("$") else a for a in arguments])  # is not here
    assert parsed.value.code == 2 and "no client-keys file at /etc/cifar10/client-keys/keys" in capsys.readouterr().err
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)(?![A-Z0-9_]*:-)", script))
    assert used <= set(image.env), f"entrypoint reads unset variables: {used - set(image.env)}"
    # HEALTHCHECK asks the health server the image starts, on its port
    assert image.healthcheck[:4] == ["python", "-m", "server.health", "check"]
    assert port_of(image.healthcheck[image.healthcheck.index("--url") + 1]) == port_of(image.env["HEALTH_BIND"])


def sent_to_the_builder(path: str, patterns: list[str]) -> bool:
    """Whether ``docker build`` sends ``path`` of the context under .dockerignore's ``patterns``: the last
    matching pattern wins, ``!`` lets a path in again, and a pattern that matches a directory covers what
    it holds."""
    parts, sent = Path(path).parts, True
    for pattern in patterns:
        body = pattern.removeprefix("!")
        if any(fnmatch.fnmatchcase("/".join(parts[:depth]), body) for depth in range(1, len(parts) + 1)):
            sent = pattern.startswith("!")
    return sent


def test_every_copy_source_exists_and_is_sent_to_the_builder(image: Image) -> None:
    lines = (line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines())
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not sent_to_the_builder("model_store/cifar10.mar", patterns)  # the ignore file still excludes
    for word, rest in image.all:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                if "$" not in source:
                    assert (REPO_ROOT / source).exists(), source
                source = source.replace("${CIFAR10_DIR}", "build/image/cifar10")  # what make image stages
                assert sent_to_the_builder(source, patterns), f"{source} is left out by .dockerignore"


@pytest.mark.parametrize("file", ["torchserve.yaml", "torchserve-gpu.yaml"])
def test_deployment_refers_to_what_the_image_has(file: str, manifests: dict[str, list[dict]], image: Image,
                                                  effective_config: dict[str, str], tmp_path: Path) -> None:
    pod = find(manifests, file, "Deployment", "cifar10-torchserve")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports.values()) == image.ports
    assert ports["http"] == int(image.env["PROXY_REST_PORT"])
    assert ports["grpc"] == int(image.env["PROXY_GRPC_PORT"])
    assert ports["metrics"] == port_of(effective_config["metrics_address"])
    assert ports["health"] == port_of(image.env["HEALTH_BIND"])
    routes = set(handler_for(Health(tmp_path, effective_config)).checks)
    for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"} and path in routes
        assert container[probe].get("timeoutSeconds", 1) > PROBE_TIMEOUT  # the health server answers in time
    assert pod["spec"]["securityContext"]["runAsUser"] == int(image.user.split(":")[0])
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert image.env["TS_WORKDIR"] in mounts  # where key_file.json is written
    secret = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts[str(Path(image.env["ACCEPTED_CLIENTS_FILE"]).parent)])
    assert secret["secret"]["defaultMode"] & 0o007 == 0, "client keys never world-readable"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts  # TorchServe unpacks archives and keeps its pid file there
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] and annotations["prometheus.io/path"] == "/metrics"
    assert {env["name"] for env in container.get("env", [])} <= {"NVIDIA_DRIVER_CAPABILITIES"}


def test_gpu_variant_differs_only_in_gpu_scheduling(manifests: dict[str, list[dict]]) -> None:
    cpu = copy.deepcopy(find(manifests, "torchserve.yaml", "Deployment"))
    gpu = copy.deepcopy(find(manifests, "torchserve-gpu.yaml", "Deployment"))
    gpu_container = gpu["spec"]["template"]["spec"]["containers"][0]
    for bound in ("requests", "limits"):
        assert gpu_container["resources"][bound].pop("nvidia.com/gpu") == 1
    gpu_container.pop("env")
    assert gpu["spec"]["template"]["spec"].pop("tolerations")[0]["key"] == "nvidia.com/gpu"
    assert gpu == cpu


def test_pod_reserves_the_cores_its_workers_are_planned_from(manifests: dict[str, list[dict]]) -> None:
    """The entrypoint plans one cifar10 worker per core of the CPU limit, as many as the memory limit holds;
    a request below the limit would let the scheduler place them on fewer cores than they were planned for."""
    resources = find(manifests, "torchserve.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    memory = int(resources["limits"]["memory"].removesuffix("Gi")) * GIB
    cores = int(resources["limits"]["cpu"])
    assert plan(cores, memory_limit=memory).default_workers == cores  # the memory limit holds them all
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_service_routes_to_named_container_ports(manifests: dict[str, list[dict]]) -> None:
    deployment = find(manifests, "torchserve.yaml", "Deployment")
    service = find(manifests, "torchserve.yaml", "Service")
    names = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= names
    assert "health" not in {port["targetPort"] for port in service["spec"]["ports"]}


def test_autoscaler_uses_the_rate_of_a_torchserve_counter(manifests: dict[str, list[dict]]) -> None:
    import ts

    hpa = find(manifests, "hpa.yaml", "HorizontalPodAutoscaler")
    deployment = find(manifests, "torchserve.yaml", "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    rules = yaml.safe_load(find(manifests, "prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"]: rule for rule in rules}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = served[metric]
    source = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"]).group(1)
    counters = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())["ts_metrics"]["counter"]
    assert source in {counter["name"] for counter in counters}, f"{source} is not a TorchServe counter"
    assert re.search(r"\brate\(<<\.Series>>\{<<\.LabelMatchers>>\}\[\w+\]\)", rule["metricsQuery"]), \
        "a counter must be read through rate(), never raw"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_locust_set_targets_the_service_with_options_the_locustfile_has(manifests: dict[str, list[dict]],
                                                                       image: Image) -> None:
    service = find(manifests, "torchserve.yaml", "Service")
    master_service = find(manifests, "locust.yaml", "Service", "locust-master")
    master = find(manifests, "locust.yaml", "Deployment", "locust-master")["spec"]["template"]["spec"]["containers"][0]
    worker = find(manifests, "locust.yaml", "Deployment", "locust-worker")["spec"]["template"]["spec"]
    serving = find(manifests, "torchserve.yaml", "Deployment")["spec"]["template"]["spec"]
    mounted = {v["secret"]["secretName"] for v in worker["volumes"] + serving["volumes"] if "secret" in v}
    assert mounted == {"cifar10-client-keys"}, "Locust sends the client key every replica accepts"
    worker_container = worker["containers"][0]
    env = {item["name"]: item["value"] for item in master["env"]}
    host = urlparse(env["LOCUST_HOST"])
    assert host.hostname == service["metadata"]["name"]
    assert host.port in {port["port"] for port in service["spec"]["ports"] if port["name"] == "http"}
    # the locustfile, where `pip install` puts the project in the image's venv (Python 3.11, pyproject.toml)
    python = re.search(r'requires-python = ">=(\d+\.\d+)', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    site = Path(image.env["PATH"].split(":")[0]).parent / "lib" / f"python{python}" / "site-packages"
    for container in (master, worker_container):
        locustfile = {item["name"]: item["value"] for item in container["env"]}["LOCUST_LOCUSTFILE"]
        assert Path(locustfile).parent.parent == site, locustfile
        assert (REPO_ROOT / Path(locustfile).relative_to(site)).is_file()
    args = worker_container["args"]
    assert args[args.index("--master-host") + 1] == master_service["metadata"]["name"]
    assert int(args[args.index("--master-port") + 1]) in {p["port"] for p in master_service["spec"]["ports"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in worker_container["volumeMounts"]}
    assert args[args.index("--data-dir") + 1] in mounts
    assert str(Path(args[args.index("--key-file") + 1]).parent) in mounts
    # every option is one Locust or the locustfile really accepts: Locust refuses unknown ones
    for container in (master, worker_container):
        result = subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"),
                                 "--list", *container["args"]], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "RestUser" in result.stdout, result.stderr[-1000:]


def test_a_stopping_pod_gets_the_time_its_drain_needs(manifests: dict[str, list[dict]], image: Image,
                                                      effective_config: dict[str, str]) -> None:
    """preStop (the endpoint leaves the Service), the supervisor's drain, HAProxy finishing a request of the
    longest allowed time, TorchServe's stop: all within the grace period, or the kubelet kills requests."""
    from server.supervisor import TORCHSERVE_STOP_S

    deployment = find(manifests, "torchserve.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) == int(image.env["DRAIN_SECONDS"])
    hard_stop = int(effective_config["default_response_timeout"]) + 15  # server.supervisor's proxy hard-stop-after
    needed = int(pre_stop[1]) + int(image.env["DRAIN_SECONDS"]) + hard_stop + TORCHSERVE_STOP_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find(manifests, "torchserve.yaml", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert budget["spec"]["maxUnavailable"] == 1


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]
