"""The export report: a markdown table for people (EXPORT.md) and the same data as JSON (export.json).

Ordinary runs write them to build/export/; `make docs` writes the committed copies in docs/.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

BUSY_PERCENT = 25.0  # other work above this share of all cores makes the timings unreliable

COLUMNS: tuple[tuple[str, str], ...] = (
    ("variant", "variant"), ("file", "file"), ("size_mb", "size MB"), ("accuracy", "accuracy %"),
    ("top1_agreement", "agreement %"), ("max_abs_diff", "max abs diff"), ("latency_b1_ms", "latency b1 ms"),
    ("images_per_s_b64", "img/s b64"), ("status", "status"),
)
TIMING_COLUMNS = ("latency_b1_ms", "images_per_s_b64")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def format_cell(key: str, value: Any) -> str:
    if key in ("accuracy", "top1_agreement"):
        return f"{100 * value:.2f}"
    if key == "max_abs_diff":
        return f"{value:.2e}"
    if key in ("size_mb", "latency_b1_ms"):
        return f"{value:.2f}"
    if key == "images_per_s_b64":
        return f"{value:.0f}"
    if key == "file":
        return f"`{value}`"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per variant; the timing columns only when the run was benchmarked."""
    timed = any(row.get("latency_b1_ms") is not None for row in rows)
    columns = [(key, title) for key, title in COLUMNS if timed or key not in TIMING_COLUMNS]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(key, row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def speedup_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Throughput and latency of each ONNX variant relative to ONNX fp32, the baseline they replace."""
    baseline = next((row for row in rows if row["variant"] == "onnx"), None)
    if baseline is None or baseline["images_per_s_b64"] is None:
        return []
    return [
        f"- `{row['variant']}`: {row['images_per_s_b64'] / baseline['images_per_s_b64']:.2f}x the throughput "
        f"and {baseline['latency_b1_ms'] / row['latency_b1_ms']:.2f}x the batch-1 speed of ONNX fp32."
        for row in rows if row["variant"].startswith("onnx_")
    ]


def busy_warning(report: dict[str, Any]) -> str | None:
    """Other work on the CPU makes thread pools wait on each other, which can slow runs by 10-100x."""
    busy = report["cpu_busy_percent_at_start"]
    if busy is None or busy < BUSY_PERCENT:
        return None
    return (f"the CPU was {busy:.0f}% busy with other work in the second before the export started "
            f"({report['cpu_count']} cores): latency and throughput are unreliable; rerun on an idle machine.")


def recorded_accuracy(report: dict[str, Any]) -> str:
    if report["checkpoint_test_accuracy"] is None:
        return "not recorded"
    return f"{100 * report['checkpoint_test_accuracy']:.2f}% on {report['checkpoint_test_images']} images"


def cpu_line(report: dict[str, Any]) -> str:
    busy = report["cpu_busy_percent_at_start"]
    return (f"- CPU: {report['cpu']}, {report['cpu_count']} logical cores; threads: {report['threads']} "
            f"(torch intra-op and onnxruntime intra_op_num_threads, for every row); "
            + (f"CPU busy with other work at start: {busy:.0f}%, " if busy is not None else "")
            + f"load average {report['load_average']}")


def floor_line(floor: dict[str, Any] | None) -> str:
    if floor is None:
        return "- Accuracy floor: not run, since a variant was already refused"
    verdict = "passed" if floor["passed"] else f"**failed**: {floor['reason']}"
    return (f"- Accuracy floor: fp32 `{floor['model']}` on all {floor['test_images']} test images "
            f"{100 * floor['accuracy']:.2f}%, at most {floor['max_points']:g} point from the checkpoint's record: "
            f"{verdict}")


def verification_sentence(report: dict[str, Any]) -> str:
    reference, limits = report["reference"], report["limits"]
    images = (f"a fixed stratified subset of {reference['test_images']} test images (the first "
              f"{reference['test_images'] // 10} of each class)" if reference["stratified_subset"]
              else f"all {reference['test_images']} test images")
    timing = ("" if report["benchmark"] is None else
              f"Latency is the median of {report['benchmark']['latency_runs']} batch-1 runs, throughput is over "
              f"{report['benchmark']['throughput_runs']} batches of 64. ")
    return (f"Accuracy and agreement (top-1 prediction equal to the checkpoint's) are over {images}, max abs diff "
            f"(of logits, vs the checkpoint's fp32 model) over the first {report['parity_images']} of them. {timing}"
            f"Acceptance: fp32 variants within {limits['fp32_tolerance']:g} max abs logit difference; INT8 at most "
            f"{limits['max_loss_dynamic']:g} (dynamic) / {limits['max_loss_static']:g} (static) accuracy points below "
            f"the checkpoint and at least {limits['min_agreement']:g}% agreement. Method: docs/EXPORT_METHOD.md.")


def render_markdown(report: dict[str, Any]) -> str:
    reference = report["reference"]
    lines = [
        "# Export report",
        "",
        "Generated by `python -m export` (see export/); rerun the command below rather than editing by hand.",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Checkpoint: `{report['checkpoint']}` (sha256 `{report['checkpoint_sha256']}`)",
        f"- Checkpoint fp32 accuracy in this run: {100 * reference['accuracy']:.2f}% on "
        f"{reference['test_images']} test images (recorded at training: {recorded_accuracy(report)})",
        floor_line(report["floor"]),
        cpu_line(report),
        f"- Versions: {report['versions']}",
        f"- Whole export (exports, verification{', timing' if report['benchmark'] else ''}, packing) took "
        f"{report['export_seconds']:.0f} s",
        *([f"- **Warning**: {busy_warning(report)}"] if busy_warning(report) else []),
        "",
        markdown_table(report["rows"]),
        "",
        verification_sentence(report),
        "",
        *speedup_notes([row for row in report["rows"] if row["status"] == "accepted"]),
    ]
    rejected = [row for row in report["rows"] if row["status"] == "rejected"]
    floor_failed = report["floor"] is not None and not report["floor"]["passed"]
    if rejected or floor_failed:
        lines += ["", "Rejected, so nothing was packed:",
                  *[f"- `{row['variant']}`: {row['reason']}" for row in rejected],
                  *([f"- accuracy floor: {report['floor']['reason']}"] if floor_failed else [])]
    if report["archives"]:
        packing = report["packing"]
        lines += [
            "", f"Packed into the model store (version {packing['model_version']}, handler `{packing['handler']}`; "
            f"`{report['archives'][-1]}` is `{packing['default_variant']}`):",
            *[f"- `{path}`" for path in report["archives"]],
            "", f"model-config.yaml: batchSize {packing['batch_size']}, maxBatchDelay {packing['max_batch_delay_ms']} ms, "
            f"handler.threads {packing['worker_threads']} (method: [EXPORT_METHOD.md](EXPORT_METHOD.md)).",
        ]
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    markdown, data = report_dir / "EXPORT.md", report_dir / "export.json"
    markdown.write_text(render_markdown(report))
    data.write_text(json.dumps(report, indent=2) + "\n")
    return markdown, data
