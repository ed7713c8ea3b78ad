"""Python gRPC stubs for TorchServe, generated at build time from the installed server's own protos.

Why generated and never committed: TorchServe ships no Python client; its ``.proto`` files exist only
inside the frontend jar (``ts/frontend/model-server.jar``). Generating from the jar that is actually
installed keeps the stubs in lockstep with the server (a committed copy would silently drift on a
TorchServe upgrade) and with the installed protobuf/grpcio runtime (generated code refuses to load
under an older runtime than the one that generated it). The output goes to ``build/grpc/``
(gitignored) together with a stamp; a changed jar or grpcio-tools regenerates it on next use.

    python -m clients.grpc_stubs        # generate (or refresh) build/grpc/ and print where
    stubs = load_stubs()                 # in code: generates on first use, then imports

Import-path quirk: protoc's Python output imports its siblings by top-level name
(``import inference_pb2``, ``from google.rpc import status_pb2``), so the build directory must be on
``sys.path``. That happens here and only here, in :func:`load_stubs`. ``google.rpc.status_pb2`` (which
``inference.proto`` needs) is generated too, as the ``google`` namespace package has no ``rpc`` unless
googleapis-common-protos is installed; if it is, that equivalent copy wins and nothing conflicts.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_ROOT / "build" / "grpc"
STAMP = "STAMP.json"
# Path inside the jar -> path under the protoc include root. TorchServe's protos import each other and
# google/* by these include paths; google/protobuf/*.proto comes from grpc_tools' bundled includes.
PROTOS = {
    "proto/inference.proto": "inference.proto",
    "proto/management.proto": "management.proto",
    "google/rpc/status.proto": "google/rpc/status.proto",
}


@dataclass(frozen=True)
class Stubs:
    """The generated modules: message classes (``*_pb2``) and service stubs (``*_pb2_grpc``)."""

    inference_pb2: ModuleType
    inference_pb2_grpc: ModuleType
    management_pb2: ModuleType
    management_pb2_grpc: ModuleType


def frontend_jar() -> Path:
    """The model-server.jar of the ``ts`` package this interpreter imports (found without starting it)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("TorchServe (the 'ts' package) is not installed: pip install torchserve")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise RuntimeError(f"TorchServe frontend jar not found at {jar}")
    return jar


def _read_protos(jar: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(jar) as archive:
        return {target: archive.read(member) for member, target in PROTOS.items()}


def _fingerprint(protos: dict[str, bytes]) -> dict[str, str]:
    """What the generated code depends on: the proto sources and the generator/runtime versions."""
    digest = hashlib.sha256()
    for name in sorted(protos):
        digest.update(name.encode() + b"\0" + protos[name] + b"\0")
    return {"protos_sha256": digest.hexdigest(), "grpcio_tools": metadata.version("grpcio-tools"),
            "protobuf": metadata.version("protobuf")}


def _up_to_date(out: Path, fingerprint: dict[str, str]) -> bool:
    try:
        return json.loads((out / STAMP).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def generate(out: Path = BUILD_DIR, force: bool = False) -> Path:
    """Extract the protos from the jar and run grpc_tools.protoc into ``out``, unless already current.

    Generation happens in a scratch directory that is then renamed into place, so a concurrent process
    (the tests beside a load test) never imports a half-written tree.
    """
    from grpc_tools import protoc  # build-time dependency only: importing the stubs does not need it

    protos = _read_protos(frontend_jar())
    fingerprint = _fingerprint(protos)
    if not force and _up_to_date(out, fingerprint):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".grpc-", dir=out.parent))
    try:
        source = scratch / "proto"
        for name, text in protos.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(text)
        generated = scratch / "python"
        generated.mkdir()
        include = resources.files("grpc_tools") / "_proto"
        args = ["grpc_tools.protoc", f"-I{source}", f"-I{include}", f"--python_out={generated}",
                f"--pyi_out={generated}", f"--grpc_python_out={generated}", *sorted(protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {sorted(protos)} (arguments: {args})")
        shutil.copytree(source, generated / "proto-src")  # for reference (grpcurl); not an importable name
        (generated / STAMP).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if _up_to_date(out, fingerprint):  # a concurrent process finished first: keep its tree
            return out
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(generated, out)
        except OSError:  # another process renamed its (identical) tree into place first
            if not _up_to_date(out, fingerprint):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


@functools.cache
def load_stubs(out: Path = BUILD_DIR) -> Stubs:
    """The generated modules, generating them first if missing or stale (works on a fresh clone)."""
    generate(out)
    if str(out) not in sys.path:
        sys.path.append(str(out))  # appended: the generated top-level names never shadow installed ones
    importlib.invalidate_caches()
    return Stubs(*(importlib.import_module(name) for name in
                   ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the stamp says it is current")
    args = parser.parse_args(argv)
    out = generate(args.out.resolve(), force=args.force)
    print(f"gRPC stubs for {frontend_jar()} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
