"""Inputs that cost work beyond their pixels, and the run that sends them: ``python -m loadtest hostile``.

``make hostile`` (2 minutes) writes docs/HOSTILE.md and docs/hostile.json.

The inputs are built here from bytes, each at most 2 MiB (``max_request_size``) and within the pixel
budget: JPEG and PNG structures whose decoding cost grows with the file rather than with the pixels
(docs/SERVING.md, "Work budget"), and the costliest images that are nevertheless within every limit
(deep, interlaced or restart-marked). tests/test_bad_input.py sends the same ones.

The run starts its own TorchServe (shipped config, the default model), measures what each input
costs the handler in-process, then sends them round-robin from ``--senders`` threads beside steady
Locust traffic of good images for ``--minutes``, and records: requests and refusals by status, the
latency of every hostile request, failed good requests and the p99 of the good ones, and worker
restarts (worker pids before and after, TorchServe's log). Passing means no failed good request, no
worker restart, no 5xx other than 503 with Retry-After, and every hostile request answered within
the handler's request deadline plus ``--slack`` seconds of queueing.
"""
from __future__ import annotations

import argparse
import io
import math
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from PIL import Image

from loadtest.archive import extract, read_archive
from loadtest.ceiling import import_handler
from loadtest.entries import request_entry
from loadtest.images import test_images
from loadtest.locust_csv import run_stats
from loadtest.report import machine, machine_line, write_json
from loadtest.run import LoadSpec, add_own_server_options, run_locust, warm_up
from server.config import free_port_overrides
from server.launcher import TorchServe

MAX_BODY = 2 * 2**20  # config.properties' max_request_size
SIDE = 4096  # the handler's default max_image_pixels is SIDE x SIDE
# The structural limits lifted (the format's one-iCCP rule is not a setting) and a long budget: what
# each input would cost a handler that had only the pixel budget.
UNGUARDED = {"max_image_side": 10**9, "max_jpeg_scans": 10**9, "max_jpeg_header_markers": 10**9, "max_png_chunks": 10**9,
             "request_cpu_budget_ms": 10_000, "request_deadline_ms": 25_000}
SHARED_MACHINE_PERCENT = 10  # CPU busy with other processes before the run, past which the report says so
RESTART_LOG_LINES = ("Worker disconnected", "Auto recovery", "Number or consecutive unsuccessful inference")


# ------------------------------------------------------------------------------------------- JPEG

def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def entropy_bytes(bits: str) -> bytes:
    """A bit string as entropy-coded JPEG data: padded with 1s, every 0xFF followed by a stuffed 0x00."""
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    return data.replace(b"\xff", b"\xff\x00")


def jpeg_scans(scans: int, side: int = SIDE) -> bytes:
    """A grayscale progressive JPEG whose every AC scan is one end-of-band run over all its blocks.

    Each such scan is ~30 bytes and makes libjpeg walk all (side/8)^2 blocks again; libjpeg accepts
    the repeated scans with a warning.
    """
    blocks = math.ceil(side / 8) ** 2
    one_code = bytes([1] + [0] * 15)  # a Huffman table with a single 1-bit code
    header = (b"\xff\xd8" + segment(0xDB, b"\x00" + b"\x01" * 64)
              + segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
              + segment(0xC4, b"\x00" + one_code + b"\x00")  # DC table: difference 0
              + segment(0xC4, b"\x10" + one_code + b"\xe0"))  # AC table: EOB14, a run of up to 32767 blocks
    dc_scan = segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + entropy_bytes("0" * blocks)
    ac_scan = segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + entropy_bytes(("0" + "1" * 14) * math.ceil(blocks / 32767))
    return header + dc_scan + ac_scan * scans + b"\xff\xd9"


def small_jpeg(side: int = 64, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buffer, "JPEG", **options)
    return buffer.getvalue()


def jpeg_header_segments(count: int) -> bytes:
    """A small JPEG with ``count`` empty comment segments before its frame: Pillow parses each in Python."""
    body = small_jpeg()
    return body[:2] + b"\xff\xfe\x00\x02" * count + body[2:]


def jpeg_fill_bytes(count: int) -> bytes:
    """A small JPEG with ``count`` 0xFF fill bytes before its first marker (allowed by the standard)."""
    body = small_jpeg()
    return body[:2] + b"\xff" * count + body[2:]


def jpeg_restart_every_block(side: int = 2048) -> bytes:
    """A baseline JPEG with a restart marker after every block: costs per block, bounded by the pixels."""
    return small_jpeg(side, restart_marker_blocks=1, quality=10)


# -------------------------------------------------------------------------------------------- PNG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes, color_type: int = 2, depth: int = 8, interlace: int = 0,
        before_data: bytes = b"", idat_size: int | None = None) -> bytes:
    """A PNG from filtered scanlines (each row prefixed with its filter byte), ``before_data`` chunks first."""
    data = zlib.compress(rows, 9)
    size = idat_size or len(data)
    idats = b"".join(chunk(b"IDAT", data[at:at + size]) for at in range(0, len(data), size))
    return (PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace))
            + before_data + idats + chunk(b"IEND", b""))


def small_png(side: int = 64) -> tuple[int, bytes]:
    return side, b"".join(b"\x00" + bytes(range(side)) * 3 for _ in range(side))


def png_chunks(count: int) -> bytes:
    """A small PNG with ``count`` empty private ancillary chunks before its data."""
    side, rows = small_png()
    return png(side, side, rows, before_data=chunk(b"hoSt", b"") * count)


def png_idat_chunks(count: int) -> bytes:
    """A small PNG with ``count`` empty IDAT chunks before its data: Pillow reads each in Python."""
    side, rows = small_png()
    return png(side, side, rows, before_data=chunk(b"IDAT", b"") * count)


def png_iccp(count: int) -> bytes:
    """A small PNG with ``count`` iCCP chunks, each 1 MiB of zeros deflated to ~1 KiB; Pillow inflates every one."""
    side, rows = small_png()
    profile = chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(2**20), 9))
    return png(side, side, rows, before_data=profile * count)


def png_ztxt(count: int) -> bytes:
    """A small PNG with ``count`` zTXt chunks of 1 MiB each (Pillow stops at MAX_TEXT_MEMORY, 64 MiB)."""
    side, rows = small_png()
    text = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(2**20), 9))
    return png(side, side, rows, before_data=text * count)


def png_deep(side: int = SIDE) -> bytes:
    """16-bit RGBA at the pixel limit, a gradient that deflates ~500:1: the most pixel work that fits 2 MiB."""
    row = b"\x01" + struct.pack(">HHHH", 1, 2, 3, 4) * side  # filter Sub: every pixel its left neighbour plus a constant
    return png(side, side, row * side, color_type=6, depth=16)


def png_strip(length: int = SIDE * SIDE) -> bytes:
    """A one-pixel-wide 16-bit RGBA PNG at the pixel limit: libpng and Pillow pay per row as well as per pixel."""
    return png(1, length, (b"\x00" + struct.pack(">HHHH", 1, 2, 3, 4)) * length, color_type=6, depth=16)


def adam7(pixels: np.ndarray) -> bytes:
    """Filtered scanlines of the seven Adam7 passes of an HxWxC uint8 image."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = bytearray()
    for x0, y0, dx, dy in passes:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            for row in sub:
                rows += b"\x00" + row.tobytes()
    return bytes(rows)


def png_interlaced(side: int = SIDE) -> bytes:
    """An Adam7-interlaced RGB PNG at the pixel limit: seven passes, still bounded by the pixels."""
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[..., 0] = np.arange(side) % 256
    return png(side, side, adam7(pixels), interlace=1)


def fitting(build: Callable[[int], bytes], unit: int) -> bytes:
    """``build(n)`` for the largest n (a multiple of ``unit``) whose body fits in MAX_BODY."""
    per_unit = len(build(2 * unit)) - len(build(unit))
    n = unit * max(1, (MAX_BODY - len(build(0))) // per_unit)
    while len(build(n)) > MAX_BODY:
        n -= unit
    return build(n)


def hostile_inputs() -> dict[str, bytes]:
    """Every class member, each as large as 2 MiB allows (the costliest version of it)."""
    return {
        "JPEG: progressive, ~59k end-of-band scans over 4096x4096": fitting(jpeg_scans, 256),
        "JPEG: 500k empty comment segments": fitting(jpeg_header_segments, 1024),
        "JPEG: 2 MiB of 0xFF fill bytes": fitting(jpeg_fill_bytes, 4096),
        "JPEG: restart marker after every block, 2048x2048": jpeg_restart_every_block(),
        "PNG: 170k empty private chunks": fitting(png_chunks, 1024),
        "PNG: 170k empty IDAT chunks": fitting(png_idat_chunks, 1024),
        "PNG: ~2000 iCCP chunks of 1 MiB each": fitting(png_iccp, 16),
        "PNG: ~2000 zTXt chunks of 1 MiB each": fitting(png_ztxt, 16),
        "PNG: 16-bit RGBA 4096x4096": png_deep(),
        "PNG: Adam7-interlaced RGB 4096x4096": png_interlaced(),
        "PNG: 16-bit RGBA 1x16777216 strip": png_strip(),
    }


# ----------------------------------------------------------------------------------- in-process cost

def archived_service(model_store: Path, model: str, scratch: Path, handler_config: dict[str, Any] | None = None):
    """The archive's own handler in this process under TorchServe's worker Context, its config overridden."""
    from ts.context import Context

    archive = read_archive(model_store / f"{model}.mar")
    model_dir = extract(archive.path, scratch)
    config = dict(archive.model_config)
    config["handler"] = dict(config.get("handler", {})) | (handler_config or {})
    context = Context(model, str(model_dir), archive.manifest, 1, None, "0.12.0", model_yaml_config=config)
    service = import_handler(model_dir / archive.handler_file, f"hostile_handler_{time.monotonic_ns()}")._service
    service.initialize(context)
    return service


def decode_cost(service: Any, body: bytes) -> dict[str, Any]:
    """What reading ``body`` as one request costs the handler's decoder: answer, decoder CPU ms, wall ms."""
    job = ([("body", body)], False)
    if service.decoder.process is None:
        service.decoder.run(([("body", small_jpeg(32))], False), 10.0, time.monotonic() + 10, 1)
    cpu, start = service.decoder._cpu_seconds(), time.monotonic()
    try:
        service.decoder.run(job, service.cpu_budget_s, time.monotonic() + service.deadline_s, 1)
        answer = "decoded"
    except Exception as err:
        answer = f"{getattr(err, 'status', type(err).__name__)}: {getattr(err, 'message', err)}"[:140]
    wall = time.monotonic() - start
    used = service.decoder._cpu_seconds() - cpu if service.decoder.process is not None else None
    return {"bytes": len(body), "answer": answer, "wall_ms": round(wall * 1000, 1),
            "decoder_cpu_ms": None if used is None else round(used * 1000, 1)}


def normal_path_cost(service: Any, bodies: dict[str, bytes], repeats: int) -> dict[str, dict[str, float]]:
    """Median per-request time of reading each body in the worker itself and through the decoder child."""
    costs = {}
    for name, body in bodies.items():
        job = ([("body", body)], False)
        inline, child = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            service._decode(job)
            inline.append(time.perf_counter() - start)
            start = time.perf_counter()
            service.decoder.run(job, service.cpu_budget_s, time.monotonic() + service.deadline_s, 1)
            child.append(time.perf_counter() - start)
        costs[name] = {"in_worker_us": round(float(np.median(inline)) * 1e6), "via_decoder_us": round(float(np.median(child)) * 1e6)}
    return costs


def typical_jpeg(pngs: list[bytes]) -> bytes:
    """A CIFAR test image enlarged to 640x480 and saved as a quality-90 JPEG, like a phone-sized upload."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(pngs[0])).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ the run

def send_hostile(server: TorchServe, model: str, inputs: dict[str, bytes], stop: threading.Event,
                 results: list[dict[str, Any]], timeout: float) -> None:
    """Send the inputs round-robin until ``stop``, one at a time, recording each answer."""
    url = f"{server.inference_url}/predictions/{model}"
    names = list(inputs)
    index = 0
    while not stop.is_set():
        name = names[index % len(names)]
        index += 1
        start = time.monotonic()
        try:
            response = server.key_ring.request("inference", "POST", url, data=inputs[name], timeout=timeout,
                                               headers={"Content-Type": "application/octet-stream"})
            status, retry_after = response.status_code, response.headers.get("Retry-After")
        except requests.RequestException as err:
            status, retry_after = type(err).__name__, None
        results.append({"input": name, "status": status, "retry_after": retry_after,
                        "seconds": round(time.monotonic() - start, 3)})


def restart_lines(server: TorchServe) -> list[str]:
    log = server.workdir / "logs" / "ts_log.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if any(marker in line for marker in RESTART_LOG_LINES)]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_input: dict[str, Counter] = {}
    for result in results:
        by_input.setdefault(result["input"], Counter())[str(result["status"])] += 1
    seconds = [result["seconds"] for result in results]
    return {"requests": len(results), "by_status": dict(Counter(str(r["status"]) for r in results)),
            "by_input": {name: dict(counts) for name, counts in by_input.items()},
            "max_seconds": max(seconds, default=None),
            "p99_seconds": round(float(np.percentile(seconds, 99)), 3) if seconds else None,
            "503_without_retry_after": sum(r["status"] == 503 and not r["retry_after"] for r in results)}


def markdown(report: dict[str, Any]) -> str:
    good, hostile, cost = report["good"], report["hostile"], report["decode_cost"]
    rows = [("| input | bytes | shipped handler answers | decoder CPU ms | wall ms | without the structural limits: "
             "answer | CPU ms |"), "|---|---|---|---|---|---|---|"]
    for name, entry in cost.items():
        free = report["unguarded_cost"][name]
        cpu = free["decoder_cpu_ms"] if free["decoder_cpu_ms"] is not None else f"> {UNGUARDED['request_cpu_budget_ms']} (stopped)"
        rows.append(f"| {name} | {entry['bytes']} | {entry['answer']} | {entry['decoder_cpu_ms']} | {entry['wall_ms']} "
                    f"| {free['answer'][:100]} | {cpu} |")
    normal = ["| request | in the worker (us) | via the decoder child (us) |", "|---|---|---|"]
    normal += [f"| {name} | {c['in_worker_us']} | {c['via_decoder_us']} |" for name, c in report["normal_path"].items()]
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(hostile["by_status"].items()))
    busy = report["other_cpu_percent_before"]
    shared = (" Other jobs were using the machine, so latencies include theirs."
              if busy >= SHARED_MACHINE_PERCENT else "")
    return "\n".join([
        "# Hostile inputs beside good traffic", "",
        f"Run {report['date']}: `{report['command']}` (method: loadtest/hostile.py, docs/SERVING.md \"Work budget\").", "",
        f"Machine: {machine_line(report['machine'])}.",
        (f"{busy:.0f}% of the machine was busy before the run; load average after it "
         f"{report['load_average_after']}.{shared}"), "",
        "## Result", "",
        "| what | value |", "|---|---|",
        f"| duration | {report['minutes']} min, {report['users']} Locust users of good images, {report['senders']} hostile sender(s) |",
        f"| good requests | {good['requests']} ({good['requests_per_s']:.0f}/s) |",
        f"| failed good requests | {good['failures']} |",
        f"| good served accuracy | {good['served_accuracy']:.1%} |" if good["served_accuracy"] is not None else "| good served accuracy | n/a |",
        f"| p99 of the good requests | {good['latency_ms']['p99']} ms (p50 {good['latency_ms']['p50']} ms) |",
        f"| hostile requests | {hostile['requests']} |",
        f"| hostile answers by status | {statuses} |",
        f"| slowest hostile answer | {hostile['max_seconds']} s (p99 {hostile['p99_seconds']} s; bound {report['bound_s']} s) |",
        (f"| worker restarts | {report['worker_restarts']} (pids {report['worker_pids_before']} -> "
         f"{report['worker_pids_after']}; {len(report['restart_log_lines'])} restart lines in ts_log.log) |"),
        f"| verdict | {'passed' if report['passed'] else 'FAILED'} |", "",
        "## What each input costs the handler (in-process, the shipped limits and budget)", "",
        *rows, "",
        f"## The decoder child on the normal path (median of {report['normal_path_repeats']} requests)", "",
        *normal, ""])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_own_server_options(parser, port_base=18430, report_name="hostile")
    parser.add_argument("--minutes", type=float, default=2.0, help="minutes of traffic (default: 2)")
    parser.add_argument("--senders", type=int, default=2, help="threads sending hostile inputs back to back (default: 2)")
    parser.add_argument("--slack", type=float, default=10.0,
                        help="seconds of queueing allowed on top of the request deadline (default: 10)")
    parser.add_argument("--repeats", type=int, default=200, help="requests per normal-path timing (default: 200)")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python -m loadtest hostile " + " ".join(argv)
    host, other_load = machine(), psutil.cpu_percent(interval=2.0)
    inputs = hostile_inputs()
    pngs, _ = test_images(args.data_dir, 8)
    with tempfile.TemporaryDirectory(prefix="hostile-") as scratch:
        service = archived_service(args.model_store, args.model, Path(scratch) / "archive")
        cost = {name: decode_cost(service, body) for name, body in inputs.items()}
        unguarded = archived_service(args.model_store, args.model, Path(scratch) / "unguarded", UNGUARDED)
        unguarded_cost = {name: decode_cost(unguarded, body) for name, body in inputs.items()}
        unguarded.decoder.stop()
        normal = normal_path_cost(service, {"CIFAR-10 32x32 PNG": pngs[0], "640x480 JPEG (quality 90)": typical_jpeg(pngs)},
                                  args.repeats)
        bound = service.deadline_s + args.slack
        service.decoder.stop()
        server = TorchServe(workdir=Path(scratch) / "server", model_store=args.model_store,
                            overrides=free_port_overrides(args.port_base) | {"load_models": f"{args.model}.mar"})
        server.start(wait_for=[args.model])
        results: list[dict[str, Any]] = []
        try:
            spec = LoadSpec.against(server, args.model, users=args.users, run_time_s=round(args.minutes * 60),
                                    data_dir=args.data_dir)
            warm_up(spec, server.key_ring)
            pids_before = sorted(worker["pid"] for worker in server.describe(args.model)["workers"])
            output = Path(scratch) / "locust"
            output.mkdir()
            stop = threading.Event()
            senders = [threading.Thread(target=send_hostile, args=(server, args.model, inputs, stop, results, bound * 3),
                                        daemon=True) for _ in range(args.senders)]
            for sender in senders:
                sender.start()
            prefix = run_locust(spec, output)
            stop.set()
            for sender in senders:
                sender.join()
            pids_after = sorted(worker["pid"] for worker in server.describe(args.model)["workers"])
            restarts = restart_lines(server)
        finally:
            server.stop()
        good = run_stats(prefix, *request_entry("rest", args.model), args.model)
    hostile = summarise(results)
    worker_restarts = len(set(pids_before) - set(pids_after))
    server_errors = sum(count for status, count in hostile["by_status"].items() if not status.startswith(("2", "4", "503")))
    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command, "machine": host,
        "other_cpu_percent_before": other_load, "load_average_after": [round(v, 2) for v in psutil.getloadavg()],
        "model": args.model, "users": args.users, "senders": args.senders, "minutes": args.minutes,
        "bound_s": bound, "decode_cost": cost, "unguarded_cost": unguarded_cost, "normal_path": normal, "normal_path_repeats": args.repeats,
        "good": good, "hostile": hostile, "worker_pids_before": pids_before, "worker_pids_after": pids_after,
        "worker_restarts": worker_restarts, "restart_log_lines": restarts,
        "passed": (good["failures"] == 0 and worker_restarts == 0 and not restarts and server_errors == 0
                   and hostile["503_without_retry_after"] == 0 and (hostile["max_seconds"] or 0) <= bound),
    }
    args.report_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.report_dir / "hostile.json", report)
    (args.report_dir / "HOSTILE.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["passed"] else 1
