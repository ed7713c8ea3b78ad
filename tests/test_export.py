"""End-to-end test of ``python -m export`` on small subsets: artifacts, metadata, verification, archives."""
from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import pytest

from export.__main__ import main
from export.variants import MODEL_PREFIX, VARIANTS, artifact_name, model_name
from export.verify import ArtifactRejected
from training.checkpoint import build_metadata, save_checkpoint
from training.data import DATA_ENV
from training.model import CLASSES, MEAN, STD, build_model

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = (REPO / "training/release/resnet18_cifar10.pt",)
DATA_DIR = os.environ.get(DATA_ENV) or str(REPO.parent / "shared/data")
# Small enough for ~1 minute on 2 cores; accuracy limits are checked by the full export, not on 128 images.
QUICK = ["--data-dir", DATA_DIR, "--test-subset", "128", "--parity-images", "128", "--calibration-images", "64",
         "--eval-batch-size", "64", "--latency-runs", "3", "--throughput-runs", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release checkpoint, else a freshly initialised model saved the same way."""
    existing = next((path for path in CHECKPOINTS if path.is_file()), None)
    if existing is not None:
        return existing
    path = tmp_path_factory.mktemp("checkpoint") / "random.pt"
    save_checkpoint(path, build_model().eval(), build_metadata())
    return path


def export_argv(checkpoint: Path, root: Path, *extra: str) -> list[str]:
    handler = root / "placeholder_handler.py"
    handler.write_text('"""Stands in for handlers/cifar10_handler.py, which the archives only copy."""\n')
    return ["--checkpoint", str(checkpoint), "--output-dir", str(root / "export"), "--model-store",
            str(root / "model_store"), "--report-dir", str(root / "docs"), "--handler", str(handler), *QUICK, *extra]


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("export")
    report = main(export_argv(checkpoint, root, "--max-loss-dynamic", "100", "--max-loss-static", "100"))
    return root, report


def sidecar(root: Path, variant: str) -> dict[str, Any]:
    return json.loads((root / "export" / artifact_name(variant)).with_suffix(".json").read_text())


def test_every_artifact_and_report_is_written(exported: tuple[Path, dict[str, Any]]) -> None:
    root, report = exported
    for variant in VARIANTS:
        assert (root / "export" / artifact_name(variant)).is_file()
        assert (root / "export" / artifact_name(variant)).with_suffix(".json").is_file()
    assert "| variant | file | size MB |" in (root / "docs/EXPORT.md").read_text()
    assert json.loads((root / "docs/export.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_json_beside_artifact_describes_it(exported: tuple[Path, dict[str, Any]], variant: str) -> None:
    description = sidecar(exported[0], variant)
    assert description["variant"] == variant
    assert (description["classes"], description["mean"], description["std"]) == (list(CLASSES), list(MEAN), list(STD))
    assert description["input_layout"] == "NCHW"
    assert description["verification"]["accepted"] is True
    assert description["benchmark"]["images_per_s_b64"] > 0


@pytest.mark.parametrize("variant", ["onnx", "onnx_int8_dynamic", "onnx_int8_static"])
def test_onnx_metadata_props(exported: tuple[Path, dict[str, Any]], variant: str) -> None:
    model = onnx.load(str(exported[0] / "export" / artifact_name(variant)))
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(props["classes"]) == list(CLASSES)
    assert json.loads(props["mean"]) == list(MEAN)
    assert json.loads(props["std"]) == list(STD)
    assert props["variant"] == variant
    assert int(props["opset"]) >= 13


@pytest.mark.parametrize("variant", ["torchscript", "onnx"])
def test_fp32_variants_match_the_checkpoint(exported: tuple[Path, dict[str, Any]], variant: str) -> None:
    verification = sidecar(exported[0], variant)["verification"]
    assert verification["max_abs_diff"] <= 1e-4
    assert verification["top1_agreement"] == 1.0
    assert verification["accuracy"] == verification["reference_accuracy"]


@pytest.mark.parametrize(("variant", "expected_op"), [("onnx_int8_static", "QuantizeLinear"),
                                                      ("onnx_int8_static", "DequantizeLinear"),
                                                      ("onnx_int8_dynamic", "ConvInteger")])
def test_int8_graphs_are_quantized(exported: tuple[Path, dict[str, Any]], variant: str, expected_op: str) -> None:
    ops = Counter(node.op_type for node in onnx.load(str(exported[0] / "export" / artifact_name(variant))).graph.node)
    assert ops[expected_op] > 0


@pytest.mark.parametrize(("name", "expected"), [(model_name(variant), artifact_name(variant)) for variant in VARIANTS]
                         + [(MODEL_PREFIX, artifact_name("onnx_int8_static"))])
def test_model_archives(exported: tuple[Path, dict[str, Any]], name: str, expected: str) -> None:
    root, _ = exported
    with zipfile.ZipFile(root / "model_store" / f"{name}.mar") as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    serialized = manifest["model"]["serializedFile"]
    assert manifest["model"]["modelName"] == name
    assert serialized == expected
    # The handler finds the description as Path(serialized_file).with_suffix(".json").
    assert {serialized, str(Path(serialized).with_suffix(".json")), "index_to_name.json", "model-config.yaml",
            "MAR-INF/MANIFEST.json"} <= names


def test_rejected_int8_raises_and_packs_nothing(checkpoint: Path, tmp_path: Path) -> None:
    argv = export_argv(checkpoint, tmp_path, "--variants", "onnx_int8_static", "--default-variant", "onnx_int8_static",
                       "--max-loss-static", "-1")
    with pytest.raises(ArtifactRejected, match="onnx_int8_static"):
        main(argv)
    assert not list((tmp_path / "model_store").glob("*.mar"))
    assert sidecar(tmp_path, "onnx_int8_static")["verification"]["accepted"] is False
    assert not (tmp_path / "export" / artifact_name("onnx")).exists()  # fp32 ONNX was only an intermediate
