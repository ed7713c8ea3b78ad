"""An experiment archive: the shipped cifar10.mar with another entry point and model-config keys added."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import yaml

from export.package import archive
from loadtest.archive import read_archive

ENTRY_POINTS = {"micro_batching": Path(__file__).with_name("micro_batching_handler.py"),
                "async": Path(__file__).with_name("async_handler.py")}


def experiment_store(shipped: Path, experiment: str, config: dict[str, Any], workdir: Path) -> Path:
    """A model store holding ``shipped``'s name, model and handler, with ``experiment``'s entry point as the
    handler and ``config`` merged into its model-config.yaml."""
    shipped_archive = read_archive(shipped)
    files = workdir / "files"
    with zipfile.ZipFile(shipped) as mar:
        mar.extractall(files)
    model_config = files / "model-config.yaml"
    model_config.write_text(yaml.safe_dump(shipped_archive.model_config | config, sort_keys=False))
    serialized = files / shipped_archive.serialized_file
    extras = [path for path in files.iterdir() if path.is_file() and path not in (serialized, model_config)]
    store = workdir / "store"
    archive(shipped_archive.manifest["model"]["modelName"], serialized, extras, ENTRY_POINTS[experiment], model_config,
            shipped_archive.manifest["model"]["modelVersion"], store)
    return store
