"""docs/PEERS.md from ``python -m loadtest peers``: per server, client and round, the targets, the setup.

The method behind it (goodput, the two clients, cores, the pipeline per CPU-second) is prose in
docs/LOADTEST.md, not here."""
from __future__ import annotations

from statistics import median
from typing import Any

from loadtest.peers.contenders import SHIPPED
from loadtest.report import machine_line

GOODPUT_TARGET = 1.1  # the shipped TorchServe's rate over the best peer's, at equal or lower p99, 0 failures
PER_CPU_TARGET = 0.85  # its answers per CPU-second of its own processes over the in-process pipeline's
MIN_ROUNDS = 3  # the targets are judged on medians over at least this many alternating rounds
CLIENTS = {"locust": "Locust (goodput: correct labels/s)", "wrk": "wrk (answers/s; labels not checked)"}


def _span(values: list[float | None], digits: int = 0) -> str:
    """``low-high`` over the rounds; a client has no percentiles for a server that never answered."""
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    values = [value for value in values if value is not None]
    return median(values) if values else None


def view(run: dict[str, Any], client: str) -> dict[str, Any] | None:
    """One run as one client saw it: its rate (goodput for Locust), answers/s, latency, failures, cores;
    None where that client did not measure the run."""
    if client == "locust":
        return {"rate": run["goodput_per_s"], "answers": run["requests_per_s"], "latency_ms": run["latency_ms"],
                "failures": run["failures"], "requests": run["requests"], "cores": run["cpu_cores"]}
    wrk = run.get("wrk")
    if not wrk:
        return None
    return {"rate": wrk["requests_per_s"], "answers": wrk["requests_per_s"], "latency_ms": wrk["latency_ms"],
            "failures": wrk["non_2xx"] + wrk["socket_errors"], "requests": wrk["requests"], "cores": wrk["cpu_cores"]}


def per_cpu(seen: dict[str, Any]) -> float | None:
    """Answers per CPU-second of the server's own processes."""
    cores = (seen["cores"] or {}).get("server")
    return seen["answers"] / cores if cores else None


def inference_of(runs: list[dict[str, Any]]) -> str:
    """Inference processes x threads as counted in the runs (the same in every run, or each one listed)."""
    shapes = sorted({f"{run['inference']['processes']} x {run['inference']['threads']}" for run in runs if run.get("inference")})
    return " / ".join(shapes) or "n/a"


def by_server(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each server that has run yet (the report is rewritten while the benchmark runs)."""
    runs = {name: [run for run in report["runs"] if run["server"] == name] for name in report["servers"]}
    return {name: server_runs for name, server_runs in runs.items() if server_runs}


def rounds_done(report: dict[str, Any]) -> int:
    return max((run["round"] for run in report["runs"]), default=0)


def versus_shipped(report: dict[str, Any], runs: list[dict[str, Any]], client: str) -> str:
    """Median over rounds of this server's rate over the shipped TorchServe's in the same round."""
    shipped = {run["round"]: view(run, client) for run in report["runs"] if run["server"] == SHIPPED}
    ratios = [seen["rate"] / shipped[run["round"]]["rate"] for run in runs
              if (seen := view(run, client)) and shipped.get(run["round"]) and shipped[run["round"]]["rate"]]
    return f"{median(ratios):.2f}" if ratios else "n/a"


def summary_table(report: dict[str, Any], client: str) -> list[str]:
    lines = ["| server | processes x threads | settings | rate/s (median) | vs shipped | p50 ms | p99 ms | failures | "
             "cores: server | answers per server CPU-s | cores: client | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_server(report).items():
        seen = [s for run in runs if (s := view(run, client))]
        if not seen:
            continue
        cores = [s["cores"] for s in seen if s["cores"]]
        lines.append(
            f"| {name} | {inference_of(runs)} | {', '.join(f'{k} {v}' for k, v in runs[0]['settings'].items())} | "
            f"{_span([s['rate'] for s in seen])} (median {median(s['rate'] for s in seen):.0f}) | "
            f"{versus_shipped(report, runs, client)} | {_span([s['latency_ms'].get('p50') for s in seen])} | "
            f"{_span([s['latency_ms'].get('p99') for s in seen])} | {sum(s['failures'] for s in seen)}/"
            f"{sum(s['requests'] for s in seen)} | {_span([c['server'] for c in cores], 2)} | "
            f"{_span([per_cpu(s) for s in seen])} | {_span([c['client'] for c in cores], 2)} | "
            f"{_span([c['other'] for c in cores], 2)} |")
    return lines


def round_table(report: dict[str, Any]) -> list[str]:
    lines = ["| round | server | processes x threads | Locust goodput/s | correct/answers | p50 / p99 ms | failures | "
             "cores: server / Locust / other | wrk answers/s | p50 / p99 ms | not 2xx or socket errors | cores: server / wrk / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        cells = []
        for client in CLIENTS:
            seen = view(run, client)
            if seen is None:
                cells.append("n/a | n/a | n/a | n/a")
                continue
            cores = seen["cores"] or {}
            cells.append(f"{_span([seen['latency_ms'].get('p50')])} / {_span([seen['latency_ms'].get('p99')])} | "
                         f"{seen['failures']} | {cores.get('server', 'n/a')} / {cores.get('client', 'n/a')} / "
                         f"{cores.get('other', 'n/a')}")
        wrk_rate = f"{run['wrk']['requests_per_s']:.1f}" if run.get("wrk") else "n/a"
        lines.append(f"| {run['round']} | {run['server']} | {inference_of([run])} | {run['goodput_per_s']:.1f} | "
                     f"{run['correct']}/{run['requests']} | {cells[0]} | {wrk_rate} | {cells[1]} |")
    return lines


def ceiling_lines(report: dict[str, Any]) -> list[str]:
    if not report["ceilings"]:
        return []
    first = report["ceilings"][0]
    rows = [f"| {c['round']} | {c['pipeline_images_per_s']:.0f} | {c['pipeline_images_per_cpu_s']:.0f} | "
            f"{c['model_images_per_s']:.0f} |" for c in report["ceilings"]]
    return ["## In-process pipeline", "",
            f"The archive's handler in process (PNG decode, preprocessing, model, answer JSON; no HTTP, no client) with "
            f"{first['processes']} process(es) x {first['threads']} thread(s) at batch {first['batch_size']}, after each "
            "round:", "",
            "| round | images/s (fastest window) | images per CPU-second | model alone, images/s |", "|---|---|---|---|",
            *rows, ""]


def error_lines(report: dict[str, Any]) -> list[str]:
    errors = [f"- Round {run['round']}, {run['server']}: {run['error']}" for run in report["runs"] if "error" in run]
    return ["", "Servers that did not start or failed during their turn:", "", *errors] if errors else []


def summarise(runs: list[dict[str, Any]], client: str) -> dict[str, Any] | None:
    """One server as one client saw it over the rounds: median rate, p99 and answers per server CPU-second,
    failures summed; None if that client measured none of its runs."""
    seen = [s for run in runs if (s := view(run, client))]
    if not seen:
        return None
    return {"server": runs[0]["server"], "rate": median(s["rate"] for s in seen),
            "p99": _median([s["latency_ms"].get("p99") for s in seen]), "failures": sum(s["failures"] for s in seen),
            "per_cpu": _median([per_cpu(s) for s in seen])}


def versus_line(client: str, ours: dict[str, Any], best: dict[str, Any]) -> str:
    """The shipped TorchServe against the best peer: rate ratio, at equal or lower p99, with 0 failures."""
    ratio = ours["rate"] / best["rate"]
    met = (ratio >= GOODPUT_TARGET and ours["p99"] is not None and best["p99"] is not None and ours["p99"] <= best["p99"]
           and not ours["failures"])
    return (f"- {CLIENTS[client]}: TorchServe {ours['rate']:.1f}/s (p99 {_span([ours['p99']])} ms) vs the best peer, "
            f"{best['server']}, {best['rate']:.1f}/s (p99 {_span([best['p99']])} ms): **{ratio:.2f}x**, target "
            f"{GOODPUT_TARGET}x at equal or lower p99 with 0 failures: **{'met' if met else 'not met'}**.")


def per_cpu_line(client: str, ours: dict[str, Any], pipeline: float) -> str:
    share = ours["per_cpu"] / pipeline
    return (f"- Per CPU-second, {client}'s window: TorchServe's own processes (frontend and workers) served "
            f"{ours['per_cpu']:.0f} answers per CPU-second against the in-process pipeline's {pipeline:.0f} images per "
            f"CPU-second with the same processes x threads: **{share:.0%}**, target {PER_CPU_TARGET:.0%}: "
            f"**{'met' if share >= PER_CPU_TARGET else 'not met'}**.")


def target_lines(report: dict[str, Any]) -> list[str]:
    """The shipped TorchServe against the best peer per client, and per CPU-second against the pipeline,
    all on medians over the rounds; not judged on fewer than MIN_ROUNDS rounds."""
    servers = by_server(report)
    peers = {name: runs for name, runs in servers.items() if runs[0]["kind"] != "torchserve"}
    if SHIPPED not in servers or not peers:
        return []
    done = len({run["round"] for run in servers[SHIPPED]})
    if done < MIN_ROUNDS:
        return [f"- Not judged: TorchServe ran {done} round(s); the targets are judged on the medians of at least "
                f"{MIN_ROUNDS} alternating rounds."]
    lines = []
    for client in CLIENTS:
        ours = summarise(servers[SHIPPED], client)
        rivals = [seen for runs in peers.values() if (seen := summarise(runs, client)) and seen["rate"] > 0]
        if ours and rivals:
            lines.append(versus_line(client, ours, max(rivals, key=lambda rival: rival["rate"])))
    pipeline = _median([ceiling.get("pipeline_images_per_cpu_s") for ceiling in report["ceilings"]])
    for client in CLIENTS:
        ours = summarise(servers[SHIPPED], client)
        if pipeline and ours and ours["per_cpu"]:
            lines.append(per_cpu_line(client, ours, pipeline))
    return lines


def peers_markdown(report: dict[str, Any], data_file: str) -> str:
    plan = report["plan"]
    targets = target_lines(report)
    peers = any(run["kind"] != "torchserve" for run in report["runs"])
    done = rounds_done(report)
    wrk_setup = (f"then wrk alone ({report['wrk_threads']} thread(s), as many connections as Locust has users, the same "
                 f"PNGs) for {report['wrk_time_s']} s measured" if report.get("wrk_time_s") else "no wrk window")
    return "\n".join([
        "# TorchServe against its peers" if peers else "# TorchServe settings side by side",
        "",
        f"Generated by `python -m loadtest peers` on {report['date']}; the raw data is in [{data_file}]({data_file}). "
        "Do not edit by hand: rerun the command.",
        "",
        f"**Machine:** {machine_line(report['machine'])}. The shipped TorchServe's plan on it: {plan['cores']} core(s), "
        f"{plan['default_workers']} worker(s) x {plan['threads']} thread(s) for the default model (docs/SERVING.md).",
        "",
        *(["## Targets (medians over the rounds)", "", *targets, ""] if targets else []),
        *[line for client, title in CLIENTS.items() if len(table := summary_table(report, client)) > 2
          for line in (f"## {title}, all rounds", "", *table, "")],
        *ceiling_lines(report),
        "## Per round",
        "",
        *round_table(report),
        *error_lines(report),
        "",
        "## Setup",
        "",
        f"- Every server serves `{report['archive']}` through the archive's own handler, with the inference processes x "
        "threads in the tables (counted while it ran; the benchmark refuses to compare servers that would run "
        "different ones); TorchServe with config.properties and the plan above, every archive of its model store "
        "loaded; a `torchserve:key=value` row changes one setting. How each peer is set up, and why there is no "
        "async FastAPI peer: [LOADTEST.md](LOADTEST.md#the-peer-benchmark).",
        f"- Load: Locust, {report['users']} closed-loop users, one CIFAR-10 test PNG per request from a pool of "
        f"{report['image_pool']}, {report['warm_up_s']} s of warm-up, {report['run_time_s']} s measured; {wrk_setup}. "
        f"Each server alone, {done} round(s)" + ("" if done == report["rounds"] else f" (of {report['rounds']} asked for)")
        + ", the order reversed every other round.",
        "- What goodput, the clients, cores and the pipeline per CPU-second mean: "
        "[LOADTEST.md](LOADTEST.md#the-peer-benchmark).",
        "",
        "## Reproduce",
        "",
        "```bash",
        "python -m export    # model_store/, see docs/EXPORT.md",
        report["command"],
        "```",
        "",
    ])
