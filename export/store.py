"""The model store as one unit: a stamp that says what built it, and an all-or-nothing replacement.

The stamp (``export-stamp.json`` in the store) records, per archive, the export key it was built
with and how many test images verified it. The key is a hash of the checkpoint, every source file
that ends up in or decides the archives, the library versions and the export settings, so
``python -m export --skip-if-current`` (``make serve``, the tests) rebuilds exactly when one changed.

A new store is assembled in a staging directory beside the old one and swapped in with one rename
(``renameat2(RENAME_EXCHANGE)`` on Linux), so a server starting at any moment sees either the old
set or the new one, and an export that fails halfway leaves the old store as it was.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

STAMP = "export-stamp.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Everything besides the checkpoint and the handler that determines what the archives hold:
# the exporter itself, and the model, normalisation and data pipeline it reads from training/.
EXPORT_SOURCES: tuple[str, ...] = ("export/*.py", "training/model.py", "training/checkpoint.py", "training/data.py")
LIBRARIES: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "torch-model-archiver")
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def source_files(handler: Path) -> list[Path]:
    files = {path for pattern in EXPORT_SOURCES for path in REPO_ROOT.glob(pattern)}
    return sorted(files) + [Path(handler).resolve()]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_key(checkpoint_sha256: str, handler: Path, settings: dict[str, Any]) -> str:
    """Hash of what an archive is made from; equal keys mean an equal store (up to timestamps)."""
    parts = {
        "checkpoint_sha256": checkpoint_sha256,
        "sources": {str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else path.name:
                    file_digest(path) for path in source_files(handler)},
        "libraries": {name: version(name) for name in LIBRARIES},
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_stamp(store: Path) -> dict[str, Any]:
    path = Path(store) / STAMP
    return json.loads(path.read_text()) if path.is_file() else {"archives": {}}


def is_current(store: Path, names: Iterable[str], key: str, verified_images: int | None) -> bool:
    """Every named archive exists, was built with ``key`` and verified on at least ``verified_images``
    images (None: on the whole test set)."""
    archives = read_stamp(store)["archives"]

    def verified_enough(entry: dict[str, Any]) -> bool:
        required = entry.get("test_images") if verified_images is None else verified_images
        return required is not None and entry.get("verified_images", 0) >= required

    return all(
        (Path(store) / f"{name}.mar").is_file() and archives.get(name, {}).get("key") == key
        and verified_enough(archives[name])
        for name in names
    )


def exchange(staging: Path, store: Path) -> None:
    """Swap two directories in one step where the kernel can (Linux), else with two renames."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(AT_FDCWD, os.fsencode(staging), AT_FDCWD, os.fsencode(store), RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(ctypes.get_errno(), f"cannot swap {staging} and {store}")
    parked = staging.with_name(staging.name + ".old")
    store.rename(parked)
    staging.rename(store)
    parked.rename(staging)


def remove_abandoned_staging(store: Path) -> None:
    """Staging directories of exports that were killed (their process is gone)."""
    for path in store.parent.glob(f".{store.name}.staging-*"):
        pid = path.name.rsplit("-", 1)[-1].removesuffix(".old")
        if not pid.isdigit() or int(pid) == os.getpid() or not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def replacing(store: Path, rebuilt: Iterable[str]) -> Iterator[Path]:
    """A staging directory holding the current store minus the ``rebuilt`` archives; swapped in on success.

    Everything else in the store (the other archives, README.md) is carried over as hard links, so
    an export of some variants merges with the archives it did not rebuild. If the block raises,
    the staging directory is deleted and ``store`` is untouched.
    """
    store = Path(store).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(store)
    staging = store.with_name(f".{store.name}.staging-{os.getpid()}")
    staging.mkdir()
    skip = {f"{name}.mar" for name in rebuilt} | {STAMP}
    try:
        if store.is_dir():
            for path in store.iterdir():
                if path.name not in skip and path.is_file():
                    os.link(path, staging / path.name)
        yield staging
        if store.is_dir():
            exchange(staging, store)
        else:
            staging.rename(store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_stamp(staging: Path, previous: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """The previous store's stamp with ``entries`` (archive name -> key, verification) replaced."""
    stamp = read_stamp(previous)
    stamp["archives"] = {**stamp["archives"], **entries}
    path = Path(staging) / STAMP
    path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return path
