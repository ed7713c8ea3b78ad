"""Shared fixtures: the CIFAR-10 data, the model store built by the export stage, a real TorchServe."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import REPO_ROOT, free_port_overrides
from server.launcher import TorchServe
from server.plan import plan_from_environment

# Every archive `python -m export` writes; the serving tests need all of them.
MODEL_NAMES = ("cifar10", "cifar10_torchscript", "cifar10_onnx", "cifar10_onnx_int8_dynamic", "cifar10_onnx_int8_static")
RELEASE_CHECKPOINT = REPO_ROOT / "training" / "release" / "resnet18_cifar10.pt"
# The replicas' proxy and load balancer are Debian's HAProxy (apt-get install haproxy); .ci/run installs it.
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None,
                                   reason="needs Debian's haproxy (apt-get install haproxy)")
# Shifts every test server's ports, so that two checkouts can run their suites side by side.
PORT_OFFSET = int(os.environ.get("TEST_PORT_OFFSET", "0"))


def ports_for(base: int) -> dict[str, str]:
    """Loopback ports base..base+4 (plus TEST_PORT_OFFSET) for a test server."""
    return free_port_overrides(base + PORT_OFFSET)


def _data_root() -> Path:
    root = Path(os.environ.get("CIFAR10_ROOT", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.fail(f"CIFAR-10 not found under {root}: set CIFAR10_ROOT to the directory holding cifar-10-batches-py")
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _data_root()


@pytest.fixture(scope="session")
def test_images(data_root: Path) -> list[tuple[bytes, int]]:
    """The first 64 CIFAR-10 test images as PNG bytes (the load tester's pool), with their labels."""
    from loadtest.images import test_images as png_pool
    from training.data import CIFAR10

    pngs, _ = png_pool(str(data_root), 64)
    return list(zip(pngs, CIFAR10(str(data_root), train=False).targets[:64]))


@pytest.fixture(scope="session")
def model_store(data_root: Path) -> Path:
    """The repository's model_store/, rebuilt first unless it holds archives of the code in this tree.

    `python -m export --skip-if-current` compares the store's stamp with a hash of the checkpoint,
    the handler, export/ and the training/ sources it uses, so the tests never serve an old handler
    or an old export; it also requires a verification on all 10,000 test images (not make serve's subset).
    """
    store = Path(os.environ.get("MODEL_STORE", REPO_ROOT / "model_store"))
    subprocess.run([sys.executable, "-m", "export", "--data-dir", str(data_root), "--model-store", str(store),
                    "--verify-images", "all", "--skip-if-current"], cwd=REPO_ROOT, check=True)
    return store


@pytest.fixture(scope="session")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    """TorchServe with the shipped production config (auth on, model API off) and the serve-time workers x
    threads of `python -m server start` (docs/SERVING.md), on test ports."""
    server = TorchServe(workdir=tmp_path_factory.mktemp("torchserve"), model_store=model_store,
                        overrides=ports_for(18080), plan=plan_from_environment())
    server.start(wait_for=list(MODEL_NAMES))
    yield server
    server.stop()
