"""What a TorchServe archive (.mar) holds: the served variant, its model-config and its serialized model.

The load test reads these from the archive itself, not from the export's build directory, so a
benchmark row always describes exactly what the server was given.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MANIFEST = "MAR-INF/MANIFEST.json"


@dataclass(frozen=True)
class Archive:
    path: Path
    manifest: dict[str, Any]
    model_config: dict[str, Any]
    metadata: dict[str, Any]  # the JSON the export packs beside the serialized model

    @property
    def serialized_file(self) -> str:
        return self.manifest["model"]["serializedFile"]

    @property
    def metadata_file(self) -> str:
        return str(Path(self.serialized_file).with_suffix(".json"))

    @property
    def config_file(self) -> str | None:
        return self.manifest["model"].get("configFile")

    @property
    def handler_file(self) -> str:
        return self.manifest["model"]["handler"]

    @property
    def variant(self) -> str:
        return self.metadata.get("variant", Path(self.serialized_file).stem)

    @property
    def threads(self) -> int:
        """Intra-op threads per worker (model-config ``handler.threads``), as the handler reads them."""
        return int(self.model_config.get("handler", {}).get("threads", 1))


def read_archive(path: str | Path) -> Archive:
    path = Path(path)
    with zipfile.ZipFile(path) as mar:
        manifest = json.loads(mar.read(MANIFEST))
        model = manifest["model"]
        config_name = model.get("configFile")
        config = yaml.safe_load(mar.read(config_name)) if config_name else {}
        metadata = json.loads(mar.read(str(Path(model["serializedFile"]).with_suffix(".json"))))
    return Archive(path, manifest, config or {}, metadata)


def rewrite(source: Path, target: Path, edits: dict[str, Callable[[bytes], bytes]]) -> Path:
    """A copy of the archive ``source`` at ``target``, each member named in ``edits`` passed through its function:
    for archives that differ from a shipped one in exactly one respect (tests, fault injection)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for item in original.infolist():
            data = original.read(item)
            copy.writestr(item, edits[item.filename](data) if item.filename in edits else data)
    return target


def extract(path: str | Path, directory: Path) -> Path:
    """Unpack the archive as TorchServe does for a worker (its model_dir)."""
    with zipfile.ZipFile(path) as mar:
        mar.extractall(directory)
    return directory
