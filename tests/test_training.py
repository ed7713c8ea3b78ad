"""The training stage: data loading, the model, a resumable training run, evaluation, and DDP on CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import evaluate as evaluate_cli
from training import train as train_cli
from training.checkpoint import load_checkpoint
from training.data import CIFAR10, load_split
from training.model import CLASSES, MEAN, STD, build_model, count_parameters

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--subset-train", "64", "--subset-test", "32", "--batch-size", "32", "--epochs", "2", "--lr", "0.05"]


def run_training(data_root: Path, output_dir: Path, *extra: str) -> dict:
    args = train_cli.get_args_parser().parse_args(["--data-dir", str(data_root), "--output-dir", str(output_dir), *TINY, *extra])
    return train_cli.main(args)


def test_loader_reads_both_splits_of_our_copy(data_root):
    train, test = CIFAR10(str(data_root), train=True), CIFAR10(str(data_root), train=False)
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.data.shape == (50_000, 32, 32, 3) and train.data.dtype.name == "uint8"
    assert train.classes == list(CLASSES)
    assert sorted(set(train.targets)) == list(range(10))
    assert torch.bincount(torch.tensor(test.targets)).tolist() == [1000] * 10


def test_transformed_samples_are_normalised_float_tensors(data_root):
    image, label = load_split(data_root, train=False, subset=8)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= label < 10
    # Normalised with the training statistics: roughly zero-centred, not in [0, 1].
    assert image.min() < 0 < image.max()


def test_augmented_training_samples_vary_between_draws(data_root):
    dataset = load_split(data_root, train=True, augment=True, subset=4)
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], other) for other in draws[1:])


def test_missing_data_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR10_ROOT"):
        load_split(tmp_path, train=False)


def test_model_is_the_cifar_resnet18():
    model = build_model().eval()
    assert count_parameters(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_interrupted_training_resumes_to_the_same_model(data_root, tmp_path):
    first = run_training(data_root, tmp_path / "interrupted", "--max-epochs-this-run", "1")
    assert first["epochs_done"] == 1 and "checkpoint" not in first
    assert (tmp_path / "interrupted" / "last.pt").exists()

    resumed = run_training(data_root, tmp_path / "interrupted")
    straight = run_training(data_root, tmp_path / "straight")
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]

    resumed_model, _ = load_checkpoint(resumed["checkpoint"])
    straight_model, _ = load_checkpoint(straight["checkpoint"])
    for (name, a), b in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def test_training_writes_a_self_describing_checkpoint_metrics_and_curves(data_root, tmp_path):
    result = run_training(data_root, tmp_path, "--half")
    payload = torch.load(result["checkpoint"], weights_only=True)
    metadata = payload["metadata"]
    assert metadata["classes"] == list(CLASSES)
    assert metadata["mean"] == list(MEAN) and metadata["std"] == list(STD)
    assert metadata["architecture"] == "resnet18-cifar" and metadata["epochs"] == 2
    assert metadata["recipe"]["batch_size"] == 32 and metadata["recipe"]["label_smoothing"] == 0.1
    # the recorded accuracy is that of exactly the stored weights, on the test images it names
    model, _ = load_checkpoint(result["checkpoint"])
    images, labels = map(torch.stack, zip(*((image, torch.tensor(label)) for image, label
                                            in load_split(data_root, train=False, subset=32))))
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert metadata["test_images"] == 32 and metadata["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # the revision is this checkout's HEAD (marked -dirty when tracked files differ from it)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO_ROOT, check=False).returncode != 0
    assert metadata["git_revision"] == head + ("-dirty" if dirty else "")
    assert metadata["weights_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in payload["state_dict"].values() if t.is_floating_point())
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss,train_acc,test_loss,test_acc") and len(lines) == 3
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_resuming_with_another_recipe_is_refused(data_root, tmp_path):
    run_training(data_root, tmp_path, "--max-epochs-this-run", "1")
    with pytest.raises(SystemExit, match="another recipe"):
        run_training(data_root, tmp_path, "--label-smoothing", "0.0")


def test_evaluate_reports_the_accuracy_recorded_at_training(data_root, tmp_path, capsys):
    checkpoint = run_training(data_root, tmp_path)["checkpoint"]
    png = tmp_path / "confusion.png"
    args = evaluate_cli.get_args_parser().parse_args(
        [checkpoint, "--data-dir", str(data_root), "--subset", "32", "--confusion-png", str(png)])
    result = evaluate_cli.main(args)
    _, metadata = load_checkpoint(checkpoint)
    assert result["accuracy"] == pytest.approx(metadata["test_accuracy"], abs=1e-6)
    assert sum(map(sum, result["confusion"])) == 32
    assert "airplane" in capsys.readouterr().out and png.stat().st_size > 10_000


def test_torchrun_trains_with_two_gloo_processes(data_root, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "training.train",
               "--data-dir", str(data_root), "--output-dir", str(tmp_path), *TINY, "--epochs", "1", "--device", "cpu"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    _, metadata = load_checkpoint(tmp_path / "model.pt")
    assert metadata["recipe"]["world_size"] == 2
