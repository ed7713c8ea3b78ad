"""gRPC client for TorchServe: a small importable class plus a management/inference CLI.

Why gRPC beside REST: one long-lived HTTP/2 channel per service and binary bodies (the image bytes
go as-is, no multipart), which is what high-rate clients and the load tester's gRPC user want. The
management CLI covers the operator tasks of the model API (list, describe, register, scale,
set-default, unregister) without curl and JSON quoting.

Token authorization is on in the shipped config, so every call carries
``authorization: Bearer <key>`` metadata: the *inference* key for the inference service (ping,
predictions) and the *management* key for the management service. Both come from the
``key_file.json`` TorchServe writes into the directory it was started from, and both expire: a
call refused with PERMISSION_DENIED "Token Authorization failed" renews the key through the token
API on the REST management address (``--management-url``) and is retried once (clients.tokens).

    python -m clients.grpc_client --key-file key_file.json list
    python -m clients.grpc_client predict cifar10 cat.png dog.jpg

Register and unregister need a server started with ``--enable-model-api`` (off in the shipped
config, where the served set is fixed at start-up); otherwise TorchServe refuses them with
PERMISSION_DENIED "Model API disabled". Describe, list, scale and set-default always work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from clients.grpc_stubs import load_stubs
from clients.tokens import REFUSAL_MESSAGE, KeyRing, Kind

# config.properties' management address: where the token API renews expired keys.
MANAGEMENT_URL = "http://127.0.0.1:8081"

# config.properties' gRPC addresses: what a client on the serving host talks to by default.
INFERENCE_TARGET = "127.0.0.1:7070"
MANAGEMENT_TARGET = "127.0.0.1:7071"
IMAGE_FIELD = "data"  # the name of the input map entry that carries the image bytes
# Inference waits at most the server's default_response_timeout (60 s); synchronous register/scale
# start worker processes, which takes long on a busy CPU host.
PREDICT_TIMEOUT = 60.0
MANAGEMENT_TIMEOUT = 180.0


class PredictionError(Exception):
    """The handler refused the input (bad image, bad topk): its HTTP-style ``code`` and ``message``.

    Needed because TorchServe 0.12's gRPC Predictions drops the status the handler sets per request
    and answers OK with the handler's error body ``{"code": 415, "type": "BadInput", "message": ...}``
    (REST answers the same body with HTTP 415). Only exceptions escaping the handler become gRPC
    errors (INTERNAL). The client turns the body back into an error so that callers cannot mistake it
    for a prediction.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TorchServeGrpc:
    """One channel per gRPC service plus the token metadata each service needs.

    ``keys`` is a :class:`KeyRing` (keys that are renewed when they expire), a fixed
    ``{"inference": ..., "management": ...}`` (used as given, refused once expired), or ``None``,
    which sends no token and is refused by a server with token authorization (PERMISSION_DENIED).
    Channels are thread-safe and meant to be reused: create one client per process, not per call.
    """

    def __init__(self, inference_target: str = INFERENCE_TARGET, management_target: str = MANAGEMENT_TARGET,
                 keys: KeyRing | dict[str, str] | None = None) -> None:
        self.stubs = load_stubs()
        self.inference_target = inference_target
        self.management_target = management_target
        self.keys = keys
        self.inference_channel = grpc.insecure_channel(inference_target)
        self.management_channel = grpc.insecure_channel(management_target)
        self.inference = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.management = self.stubs.management_pb2_grpc.ManagementAPIsServiceStub(self.management_channel)

    @classmethod
    def from_key_file(cls, key_file: str | Path = "key_file.json", management_url: str = MANAGEMENT_URL,
                      **targets: str) -> "TorchServeGrpc":
        """A client whose keys come from ``key_file`` (TorchServe's start directory) and are renewed
        through the token API at ``management_url`` when they expire."""
        return cls(keys=KeyRing(key_file, management_url), **targets)

    def _call(self, kind: Kind, method: Any, request: Any, timeout: float) -> Any:
        """``method(request)`` with the ``kind`` key; a refused key is renewed and the call retried once."""
        key = self.keys[kind] if self.keys is not None else None
        try:
            return method(request, metadata=_metadata(key), timeout=timeout)
        except grpc.RpcError as err:
            if not (isinstance(self.keys, KeyRing) and key is not None and is_key_refusal(err)):
                raise
        return method(request, metadata=_metadata(self.keys.renew(kind, key)), timeout=timeout)

    # --- inference service (inference key) ---------------------------------------------------------

    def ping(self, timeout: float = 10.0) -> str:
        """The server's health string, e.g. ``Healthy``."""
        from google.protobuf import empty_pb2

        health = self._call("inference", self.inference.Ping, empty_pb2.Empty(), timeout).health
        try:
            return json.loads(health)["status"]  # TorchServe sends '{"status": "Healthy"}'
        except (ValueError, KeyError, TypeError):
            return health

    def predict_raw(self, model: str, image: bytes, version: str | None = None, topk: int | None = None,
                    timeout: float = PREDICT_TIMEOUT) -> bytes:
        """The handler's response body for one image, undecoded (what the load tester times)."""
        inputs = {IMAGE_FIELD: image}
        if topk:
            inputs["topk"] = str(topk).encode()
        request = self.stubs.inference_pb2.PredictionsRequest(model_name=model, model_version=version or "",
                                                              input=inputs)
        return self._call("inference", self.inference.Predictions, request, timeout).prediction

    def predict(self, model: str, image: bytes, version: str | None = None, topk: int | None = None,
                timeout: float = PREDICT_TIMEOUT) -> dict[str, Any]:
        """``{"label": ..., "probabilities": {...}}`` for one PNG/JPEG image, as over REST.

        Raises :class:`PredictionError` when the handler refused the image, ``grpc.RpcError`` otherwise.
        """
        result = json.loads(self.predict_raw(model, image, version, topk, timeout))
        if isinstance(result, dict) and {"code", "type", "message"} <= result.keys() and "label" not in result:
            raise PredictionError(int(result["code"]), str(result["message"]))
        return result

    # --- management service (management key) -------------------------------------------------------

    def _manage(self, method: str, request_type: str, timeout: float = MANAGEMENT_TIMEOUT, **fields: Any) -> str:
        request = getattr(self.stubs.management_pb2, request_type)(**fields)
        return self._call("management", getattr(self.management, method), request, timeout).msg

    def list_models(self, limit: int = 100, next_page_token: int = 0) -> dict[str, Any]:
        """``{"models": [{"modelName", "modelUrl"}], "nextPageToken"?}``.

        ``limit`` must be 1..1000: with 0 (the proto default) TorchServe returns no models at all.
        """
        return json.loads(self._manage("ListModels", "ListModelsRequest", limit=limit, next_page_token=next_page_token))

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        """One entry per described version: batchSize, maxBatchDelay, workers, ... (as REST's describe)."""
        return json.loads(self._manage("DescribeModel", "DescribeModelRequest", model_name=model,
                                       model_version=version or ""))

    def register(self, url: str, name: str | None = None, batch_size: int = 0, max_batch_delay: int = 0,
                 initial_workers: int = 1, synchronous: bool = True) -> str:
        """Register an archive (a file name in the model store, or an allowed URL) and start its workers.

        Zero means "the archive's model-config.yaml or TorchServe's default" for batch size and delay.
        Synchronous by default so that the model can serve as soon as this returns.
        """
        return self._manage("RegisterModel", "RegisterModelRequest", url=url, model_name=name or "",
                            batch_size=batch_size, max_batch_delay=max_batch_delay,
                            initial_workers=initial_workers, synchronous=synchronous)

    def scale(self, model: str, min_workers: int, max_workers: int, version: str | None = None,
              synchronous: bool = True) -> str:
        """Set the worker range; synchronous by default, so describe() shows the new workers on return."""
        return self._manage("ScaleWorker", "ScaleWorkerRequest", model_name=model, model_version=version or "",
                            min_worker=min_workers, max_worker=max_workers, synchronous=synchronous)

    def set_default(self, model: str, version: str) -> str:
        """Route unversioned predictions for ``model`` to ``version``."""
        return self._manage("SetDefault", "SetDefaultRequest", model_name=model, model_version=version)

    def unregister(self, model: str, version: str | None = None) -> str:
        """Remove ``model`` (its default version, or ``version``) and stop its workers."""
        return self._manage("UnregisterModel", "UnregisterModelRequest", model_name=model, model_version=version or "")

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()

    def __enter__(self) -> "TorchServeGrpc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key is not None else ()


def is_key_refusal(error: grpc.RpcError) -> bool:
    """TorchServe (PERMISSION_DENIED) or a replica's proxy (UNAUTHENTICATED) refusing the key (expired, wrong,
    missing), as opposed to refusing the call."""
    return (error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)  # type: ignore[attr-defined]
            and REFUSAL_MESSAGE in (error.details() or ""))  # type: ignore[attr-defined]


def describe_error(error: grpc.RpcError, target: str) -> str:
    """One line an operator can act on: the gRPC status, TorchServe's message, and a hint.

    TorchServe appends the Java exception class on a second line of the details; it is dropped.
    """
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details = (error.details() or "").strip()  # type: ignore[attr-defined]
    message = details.splitlines()[0] if details else "(no details)"
    hint = ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = "is TorchServe running and listening there?"
    elif "Token Authorization failed" in details:
        hint = ("the key was refused even after renewing it: pass the key_file.json of the running server with "
                "--key-file and its REST management address with --management-url (keys are new at every start "
                "and expire after token_expiration_min; the inference and management keys are not interchangeable)")
    elif "Model API disabled" in details:
        hint = "the server must be started with --enable-model-api to register or unregister models"
    elif code == grpc.StatusCode.UNKNOWN and not details:
        hint = ("an exception TorchServe does not map to a status, e.g. registering a model version that is "
                "already registered; see the server's logs/ts_log.log")
    return f"gRPC {code.name} from {target}: {message}" + (f" ({hint})" if hint else "")


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.grpc_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="key_file.json written by TorchServe in its start directory (default: %(default)s)")
    parser.add_argument("--inference-target", default=INFERENCE_TARGET, help="host:port (default: %(default)s)")
    parser.add_argument("--management-target", default=MANAGEMENT_TARGET, help="host:port (default: %(default)s)")
    parser.add_argument("--management-url", default=MANAGEMENT_URL,
                        help="REST management address, whose token API renews expired keys (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("ping", help="server health (inference service)")
    predict = commands.add_parser("predict", help="classify PNG/JPEG files; prints {file: prediction} as JSON")
    predict.add_argument("name")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--version")
    predict.add_argument("--topk", type=int, help="also list the K most probable classes")

    listing = commands.add_parser("list", help="registered models")
    listing.add_argument("--limit", type=_limit, default=100, help="at most this many, 1..1000 (default: %(default)s)")
    describe = commands.add_parser("describe", help="a model's configuration and workers")
    describe.add_argument("name")
    describe.add_argument("--version", help='a version, or "all" (default: the default version)')
    register = commands.add_parser("register", help="register an archive and start its workers (--enable-model-api)")
    register.add_argument("url", help="a .mar file name in the model store, or an allowed URL")
    register.add_argument("--name", help="model name (default: the one in the archive)")
    register.add_argument("--batch-size", type=int, default=0, help="default: the archive's model-config.yaml")
    register.add_argument("--max-batch-delay", type=int, default=0, help="ms; default: model-config.yaml")
    register.add_argument("--initial-workers", type=int, default=1)
    scale = commands.add_parser("scale", help="set a model's worker range and wait for it")
    scale.add_argument("name")
    scale.add_argument("--min-workers", type=int, required=True)
    scale.add_argument("--max-workers", type=int, required=True)
    scale.add_argument("--version")
    default = commands.add_parser("set-default", help="route unversioned requests to VERSION")
    default.add_argument("name")
    default.add_argument("version")
    unregister = commands.add_parser("unregister", help="remove a model version (--enable-model-api)")
    unregister.add_argument("name")
    unregister.add_argument("--version")
    return parser


def predict_files(client: TorchServeGrpc, model: str, images: list[Path], version: str | None,
                  topk: int | None) -> dict[str, Any]:
    """``{file: prediction}``; a refused image is reported on stderr and the others still classified."""
    results: dict[str, Any] = {}
    for path in images:
        try:
            results[str(path)] = client.predict(model, path.read_bytes(), version, topk)
        except PredictionError as err:
            print(f"error: {path}: refused by the handler with {err.code}: {err.message}", file=sys.stderr)
    return results


def run(client: TorchServeGrpc, args: argparse.Namespace) -> Any:
    """Execute one subcommand; returns what to print (JSON-able or a status line)."""
    match args.command:
        case "ping":
            return client.ping()
        case "predict":
            return predict_files(client, args.name, args.images, args.version, args.topk)
        case "list":
            return client.list_models(args.limit)
        case "describe":
            return client.describe(args.name, args.version)
        case "register":
            return client.register(args.url, args.name, args.batch_size, args.max_batch_delay, args.initial_workers)
        case "scale":
            return client.scale(args.name, args.min_workers, args.max_workers, args.version)
        case "set-default":
            return client.set_default(args.name, args.version)
        case "unregister":
            return client.unregister(args.name, args.version)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        keys = KeyRing(args.key_file, args.management_url)
    except FileNotFoundError:
        print(f"error: key file {args.key_file} not found: run from the directory where torchserve was started "
              "or pass --key-file", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as err:
        print(f"error: {args.key_file} is not a TorchServe key file: expected JSON with inference.key, "
              f"management.key and API.key ({type(err).__name__})", file=sys.stderr)
        return 2
    target = args.inference_target if args.command in ("ping", "predict") else args.management_target
    try:
        with TorchServeGrpc(args.inference_target, args.management_target, keys) as client:
            result = run(client, args)
    except grpc.RpcError as err:
        print(f"error: {describe_error(err, target)}", file=sys.stderr)
        return 1
    except OSError as err:  # an unreadable image file
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 1 if args.command == "predict" and len(result) < len(args.images) else 0


if __name__ == "__main__":
    raise SystemExit(main())
