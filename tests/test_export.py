"""End-to-end tests of ``python -m export``: artifacts, metadata, every verification gate, archives, the model store.

The exports run on a stratified subset of the test set (every gate at its shipped limit) plus the
accuracy floor on all 10,000 images. Each refusal test starts from a copy of a good store and
checks that the refused export leaves it byte for byte as it was.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import export.__main__ as exporter
from export.__main__ import archive_key, get_args_parser, main
from export.data import stratified_indices
from export.store import STAMP, is_current, read_stamp, replacing
from export.variants import MODEL_PREFIX, VARIANTS, artifact_name, model_name
from export.verify import ArtifactRejected, floor_reason, rejection_reason
from tests.conftest import MODEL_NAMES, RELEASE_CHECKPOINT
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import CIFAR10
from training.model import CLASSES, MEAN, STD

REPO = Path(__file__).resolve().parent.parent
VERIFY_IMAGES = 500
HANDLER = REPO / "handlers" / "cifar10_handler.py"


def export_argv(data_root: Path, root: Path, *extra: str, checkpoint: Path = RELEASE_CHECKPOINT) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_root), "--output-dir", str(root / "export"),
            "--model-store", str(root / "model_store"), "--report-dir", str(root / "report"),
            "--handler", str(HANDLER), "--verify-images", str(VERIFY_IMAGES), *extra]


def digests(store: Path) -> dict[str, str]:
    """Every file in the store and its sha256: what 'left as it was' means."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(store.iterdir())}


def staging_dirs(store: Path) -> list[Path]:
    return list(store.parent.glob(f".{store.name}.staging-*"))


@pytest.fixture(scope="module")
def exported(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Every variant exported into a store that, like the repository's, already holds a README."""
    root = tmp_path_factory.mktemp("export")
    (root / "model_store").mkdir()
    (root / "model_store" / "README.md").write_text("kept by every export\n")
    return root, main(export_argv(data_root, root))


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    """A store of two archives, a stamp and the README, for the mechanics of replacing it."""
    store = tmp_path / "model_store"
    store.mkdir()
    for name in ("README.md", "cifar10.mar", "cifar10_onnx.mar", STAMP):
        (store / name).write_text(f"old {name}\n")
    return store


@pytest.fixture
def previous_store(exported: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A copy of the good store, for an export that must leave it alone."""
    store = tmp_path / "model_store"
    shutil.copytree(exported[0] / "model_store", store)
    return store


def refused_export(argv: list[str], store: Path, match: str) -> None:
    """The export raises ArtifactRejected matching ``match`` and ``store`` is exactly as before."""
    before = digests(store)
    with pytest.raises(ArtifactRejected, match=match):
        main(argv)
    assert digests(store) == before
    assert not staging_dirs(store)


def run_report(root: Path) -> dict[str, Any]:
    return json.loads((root / "report" / "export.json").read_text())


def sidecar(root: Path, variant: str) -> dict[str, Any]:
    return json.loads((root / "export" / artifact_name(variant)).with_suffix(".json").read_text())


def test_every_artifact_and_report_is_written(exported: tuple[Path, dict[str, Any]]) -> None:
    root, report = exported
    for variant in VARIANTS:
        assert (root / "export" / artifact_name(variant)).is_file()
        assert (root / "export" / artifact_name(variant)).with_suffix(".json").is_file()
    assert "| variant | file | size MB |" in (root / "report/EXPORT.md").read_text()
    assert json.loads((root / "report/export.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_stratified_subset_is_fixed_and_balanced(data_root: Path) -> None:
    labels = np.array(CIFAR10(str(data_root), train=False).targets)
    indices = stratified_indices(labels, VERIFY_IMAGES)
    assert np.array_equal(indices, stratified_indices(labels, VERIFY_IMAGES))
    assert Counter(labels[indices].tolist()) == {label: VERIFY_IMAGES // 10 for label in range(10)}
    assert len(stratified_indices(labels, None)) == len(labels) == 10_000


@pytest.mark.parametrize("variant", VARIANTS)
def test_json_beside_artifact_describes_it(exported: tuple[Path, dict[str, Any]], variant: str) -> None:
    description = sidecar(exported[0], variant)
    assert description["variant"] == variant
    assert (description["classes"], description["mean"], description["std"]) == (list(CLASSES), list(MEAN), list(STD))
    assert description["input_layout"] == "NCHW"
    verification = description["verification"]
    assert verification["accepted"] is True
    assert verification["test_images"] == VERIFY_IMAGES
    assert verification["reference_accuracy"] == exported[1]["reference"]["accuracy"]
    assert "benchmark" not in description  # timing is the docs path's job (--benchmark), not the serving path's


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


@pytest.mark.parametrize("variant", ["onnx_int8_dynamic", "onnx_int8_static"])
def test_int8_variants_pass_their_gates(exported: tuple[Path, dict[str, Any]], variant: str) -> None:
    verification = sidecar(exported[0], variant)["verification"]
    assert verification["top1_agreement"] >= 0.99
    assert 100 * (verification["reference_accuracy"] - verification["accuracy"]) <= verification["limit"]


def test_accuracy_floor_uses_the_whole_test_set(exported: tuple[Path, dict[str, Any]]) -> None:
    floor = exported[1]["floor"]
    release = torch.load(RELEASE_CHECKPOINT, weights_only=True)["metadata"]
    assert floor["passed"] is True
    assert floor["test_images"] == release["test_images"] == 10_000
    assert abs(floor["accuracy"] - release["test_accuracy"]) <= 0.001


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
        handler = mar.read(HANDLER.name)
    serialized = manifest["model"]["serializedFile"]
    assert manifest["model"]["modelName"] == name
    assert serialized == expected
    assert handler == HANDLER.read_bytes()
    # The handler finds the description as Path(serialized_file).with_suffix(".json").
    assert {serialized, str(Path(serialized).with_suffix(".json")), "index_to_name.json", "model-config.yaml",
            "MAR-INF/MANIFEST.json"} <= names


def test_store_keeps_its_readme_and_stamps_every_archive(exported: tuple[Path, dict[str, Any]]) -> None:
    store = exported[0] / "model_store"
    assert (store / "README.md").read_text() == "kept by every export\n"
    archives = read_stamp(store)["archives"]
    assert set(archives) == set(MODEL_NAMES)
    assert {entry["verified_images"] for entry in archives.values()} == {VERIFY_IMAGES}
    assert not staging_dirs(store)


def test_skip_if_current_reuses_only_what_this_tree_would_build(exported: tuple[Path, dict[str, Any]],
                                                                data_root: Path, tmp_path: Path) -> None:
    """The stamp stands for the checkpoint, the handler and the settings: change one and the store is stale."""
    root, _ = exported
    store = root / "model_store"
    assert main(export_argv(data_root, root, "--skip-if-current"))["skipped"] is True
    args = get_args_parser().parse_args(export_argv(data_root, root))
    assert is_current(store, MODEL_NAMES, archive_key(args), VERIFY_IMAGES)
    assert not is_current(store, MODEL_NAMES, archive_key(args), None)  # make test / make verify want all 10,000
    edited = tmp_path / HANDLER.name
    edited.write_text(HANDLER.read_text() + "\n# edited\n")
    assert not is_current(store, MODEL_NAMES, archive_key(get_args_parser().parse_args(
        export_argv(data_root, root, "--handler", str(edited)))), VERIFY_IMAGES)
    assert not is_current(store, MODEL_NAMES, archive_key(get_args_parser().parse_args(
        export_argv(data_root, root, "--batch-size", "16"))), VERIFY_IMAGES)


def test_fp32_artifact_that_differs_is_refused(data_root: Path, previous_store: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter bug that shifts every logit by 1e-3 keeps the accuracy but must not reach the store."""
    export_torchscript = exporter.export_torchscript

    def shifted(model: torch.nn.Module, path: Path) -> str:
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.fc.bias += 1e-3
        return export_torchscript(broken, path)

    monkeypatch.setattr(exporter, "export_torchscript", shifted)
    argv = export_argv(data_root, tmp_path, "--variants", "torchscript", "--default-variant", "torchscript")
    refused_export(argv, previous_store, r"torchscript: max \|logit diff\| \S+ exceeds 0\.0001")
    assert run_report(tmp_path)["floor"] is None  # refused on the verified images, without the full-test-set pass


def test_int8_artifact_that_loses_accuracy_is_refused(data_root: Path, previous_store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Static INT8 calibrated on images 20x too dark (ranges far too narrow) saturates and must be refused."""
    quantize_int8_static = exporter.quantize_int8_static
    monkeypatch.setattr(exporter, "quantize_int8_static",
                        lambda source, target, images, method: quantize_int8_static(source, target, images / 20, method))
    argv = export_argv(data_root, tmp_path, "--variants", "onnx_int8_static", "--default-variant", "onnx_int8_static")
    refused_export(argv, previous_store, r"onnx_int8_static: accuracy .* points below the checkpoint")
    assert sidecar(tmp_path, "onnx_int8_static")["verification"]["accepted"] is False
    assert not (tmp_path / "export" / artifact_name("onnx")).exists()  # fp32 ONNX was only an intermediate
    assert run_report(tmp_path)["floor"] is None


def test_corrupt_checkpoint_is_refused_by_the_accuracy_floor(data_root: Path, previous_store: Path,
                                                             tmp_path: Path) -> None:
    """Half of one convolution zeroed: every export reproduces it faithfully, but not the recorded accuracy."""
    model, metadata = load_checkpoint(RELEASE_CHECKPOINT)
    with torch.no_grad():
        weight = model.layer1[0].conv1.weight
        weight[: weight.shape[0] // 2] = 0
    corrupt = tmp_path / "corrupt.pt"
    save_checkpoint(corrupt, model, metadata)
    argv = export_argv(data_root, tmp_path, "--variants", "onnx", "--default-variant", "onnx", checkpoint=corrupt)
    refused_export(argv, previous_store, r"accuracy floor: fp32 accuracy .* differs from the 93\.48% recorded")
    assert sidecar(tmp_path, "onnx")["verification"]["accepted"] is True  # the export itself was faithful


@pytest.mark.parametrize(("measured", "refused"), [(0.9348, False), (0.9358, False), (0.9338, False),
                                                   (0.9359, True), (0.9337, True), (0.90, True)])
def test_floor_allows_exactly_a_tenth_of_a_point(measured: float, refused: bool) -> None:
    assert (floor_reason(measured, 10_000, 0.9348, 10_000, 0.1) is not None) is refused


def test_floor_needs_a_recorded_full_test_set_accuracy() -> None:
    assert "records no test accuracy" in floor_reason(0.93, 10_000, None, None, 0.1)
    assert "over 5000 test images" in floor_reason(0.93, 10_000, 0.93, 5000, 0.1)


@pytest.mark.parametrize(("accuracy", "agreement", "reason"), [
    (0.9340, 0.990, None), (0.9340, 0.9899, "agreement"), (0.9299, 0.995, "points below"),
    (0.9300, 0.995, None), (0.9500, 0.98, "agreement"),
])
def test_int8_gates_at_their_limits(accuracy: float, agreement: float, reason: str | None) -> None:
    """0.5 point accuracy loss allowed (static) and at least 99.0% top-1 agreement, each on its own."""
    result = {"accuracy": accuracy, "top1_agreement": agreement, "max_abs_diff": 0.3}
    found = rejection_reason("onnx_int8_static", result, 0.9350, 0.5, 0.99)
    assert (found is None) if reason is None else (reason in found)


def test_failed_packing_leaves_the_store_whole(small_store: Path) -> None:
    """A crash halfway through writing the new store: the old one is untouched and no staging is left."""
    before = digests(small_store)
    with pytest.raises(OSError, match="disk full"):
        with replacing(small_store, ["cifar10_onnx"]) as staging:
            (staging / "cifar10_onnx.mar").write_bytes(b"half an archive")
            raise OSError("disk full")
    assert digests(small_store) == before
    assert not staging_dirs(small_store)


def test_partial_export_merges_with_the_small_store(small_store: Path) -> None:
    """Rebuilding some archives replaces exactly those; the others and the README stay as they were."""
    before = digests(small_store)
    with replacing(small_store, ["cifar10_onnx"]) as staging:
        assert not (staging / "cifar10_onnx.mar").exists() and not (staging / STAMP).exists()
        (staging / "cifar10_onnx.mar").write_bytes(b"new archive")
    after = digests(small_store)
    assert after.pop("cifar10_onnx.mar") != before.pop("cifar10_onnx.mar")
    before.pop(STAMP)
    assert after == before
    assert not staging_dirs(small_store)


def test_staging_left_by_a_killed_export_is_removed(small_store: Path) -> None:
    abandoned = small_store.with_name(f".{small_store.name}.staging-999999999")
    abandoned.mkdir()
    with replacing(small_store, ["cifar10_onnx"]) as staging:
        (staging / "cifar10_onnx.mar").write_bytes(b"new archive")
    assert not staging_dirs(small_store)


def test_served_store_is_current_and_fully_verified(model_store: Path) -> None:
    """What the serving tests use: archives of this tree's code, verified on all 10,000 test images."""
    args = get_args_parser().parse_args(["--checkpoint", str(RELEASE_CHECKPOINT), "--handler", str(HANDLER),
                                         "--model-store", str(model_store)])
    assert is_current(model_store, MODEL_NAMES, archive_key(args), None)
    assert {entry["verified_images"] for entry in read_stamp(model_store)["archives"].values()} == {10_000}
