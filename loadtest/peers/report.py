"""docs/PEERS.md from ``python -m loadtest peers``: per server and per round, the target, the setup.

The method behind it (what goodput, cores and the ceiling mean) is prose in docs/LOADTEST.md, not here."""
from __future__ import annotations

from statistics import median
from typing import Any

from loadtest.report import machine_line

SHIPPED = "torchserve"  # the contender that is the product; every other torchserve:... is an experiment
GOODPUT_TARGET = 1.1  # shipped goodput over the best peer's, at equal or lower p99
CEILING_TARGET = 0.9  # served answers/s over the in-process pipeline ceiling with the same workers x threads


def _span(values: list[float | None], digits: int = 0) -> str:
    """``low-high`` over the rounds; Locust has no percentiles for a server that never answered."""
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def _cores(runs: list[dict[str, Any]], key: str) -> str:
    values = [run["cpu_cores"][key] for run in runs if run["cpu_cores"]]
    return _span(values, 2) if values else "n/a"


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def by_server(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each server that has run yet (the report is rewritten while the benchmark runs)."""
    runs = {name: [run for run in report["runs"] if run["server"] == name] for name in report["servers"]}
    return {name: server_runs for name, server_runs in runs.items() if server_runs}


def rounds_done(report: dict[str, Any]) -> str:
    """Rounds measured, and how many were asked for when the run was cut short."""
    done = max((run["round"] for run in report["runs"]), default=0)
    return str(done) if done == report["rounds"] else f"{done} (of {report['rounds']} asked for)"


def versus_shipped(report: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """Median over rounds of this server's goodput over the shipped TorchServe's in the same round."""
    shipped = {run["round"]: run["goodput_per_s"] for run in report["runs"] if run["server"] == SHIPPED}
    ratios = [run["goodput_per_s"] / shipped[run["round"]] for run in runs if shipped.get(run["round"])]
    return f"{median(ratios):.2f}" if ratios else "n/a"


def summary_table(report: dict[str, Any]) -> list[str]:
    lines = ["| server | settings | goodput/s | vs shipped | answers/s | p50 ms | p99 ms | failures | cores: server | Locust "
             "| other |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_server(report).items():
        lines.append(
            f"| {name} | {_settings(runs[0]['settings'])} | {_span([r['goodput_per_s'] for r in runs])} "
            f"(median {median(r['goodput_per_s'] for r in runs):.0f}) | {versus_shipped(report, runs)} | "
            f"{_span([r['requests_per_s'] for r in runs])} | "
            f"{_span([r['latency_ms']['p50'] for r in runs])} | {_span([r['latency_ms']['p99'] for r in runs])} | "
            f"{sum(r['failures'] for r in runs)}/{sum(r['requests'] for r in runs)} | {_cores(runs, 'server')} | "
            f"{_cores(runs, 'locust')} | {_cores(runs, 'other')} |")
    return lines


def round_table(report: dict[str, Any]) -> list[str]:
    lines = ["| round | server | goodput/s | correct/answers | p50 ms | p99 ms | failures | cores: server / Locust / other |",
             "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        cores = run["cpu_cores"] or {}
        lines.append(f"| {run['round']} | {run['server']} | {run['goodput_per_s']:.1f} | {run['correct']}/{run['requests']} | "
                     f"{_span([run['latency_ms']['p50']])} | {_span([run['latency_ms']['p99']])} | {run['failures']} | "
                     f"{cores.get('server', 'n/a')} / {cores.get('locust', 'n/a')} / {cores.get('other', 'n/a')} |")
    return lines


def error_lines(report: dict[str, Any]) -> list[str]:
    errors = [f"- Round {run['round']}, {run['server']}: {run['error']}" for run in report["runs"] if "error" in run]
    return ["", "Servers that did not start or failed during their turn:", "", *errors] if errors else []


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's goodput and p99 (medians over the given runs), failures summed."""
    p99s = [run["latency_ms"]["p99"] for run in runs if run["latency_ms"]["p99"] is not None]
    return {"server": runs[0]["server"], "goodput": median(run["goodput_per_s"] for run in runs),
            "p99": median(p99s) if p99s else None, "failures": sum(run["failures"] for run in runs)}


def versus_line(label: str, ours: dict[str, Any], best: dict[str, Any]) -> str:
    """The shipped TorchServe against the best peer: goodput ratio, at equal or lower p99, with 0 failures."""
    ratio = ours["goodput"] / best["goodput"]
    met = ratio >= GOODPUT_TARGET and ours["p99"] is not None and ours["p99"] <= best["p99"] and not ours["failures"]
    return (f"- {label}: TorchServe {ours['goodput']:.1f} goodput/s (p99 {_span([ours['p99']])} ms) vs the best peer, "
            f"{best['server']}, {best['goodput']:.1f}/s (p99 {_span([best['p99']])} ms): **{ratio:.2f}x**, target "
            f"{GOODPUT_TARGET}x at equal or lower p99 with 0 failures: **{'met' if met else 'not met'}**.")


def target_lines(report: dict[str, Any]) -> list[str]:
    """Per round: the shipped TorchServe against the best peer of the same round, and against its ceiling."""
    lines = []
    peers = [run for run in report["runs"] if run["kind"] != "torchserve"]
    shipped = [run for run in report["runs"] if run["server"] == SHIPPED]
    for run in shipped:
        rivals = [peer for peer in peers if peer["round"] == run["round"] and peer["goodput_per_s"] > 0]
        if rivals:
            lines.append(versus_line(f"Round {run['round']}", summarise([run]),
                                     max((summarise([peer]) for peer in rivals), key=lambda peer: peer["goodput"])))
    servers = by_server(report)
    rivals = [summarise(runs) for name, runs in servers.items() if runs[0]["kind"] != "torchserve"]
    if SHIPPED in servers and len(shipped) > 1 and any(rival["goodput"] > 0 for rival in rivals):
        lines.append(versus_line("All rounds, medians", summarise(shipped), max(rivals, key=lambda peer: peer["goodput"])))
    if report["ceilings"] and shipped:
        limit = max(report["ceilings"], key=lambda c: c["pipeline_images_per_s"])
        best = max(shipped, key=lambda run: run["requests_per_s"])
        share = best["requests_per_s"] / limit["pipeline_images_per_s"]
        lines.append(f"- In-process pipeline ceiling with the shipped {limit['processes']} process(es) x {limit['threads']} "
                     f"thread(s) at batch {limit['batch_size']} (no HTTP, no Locust, on the same machine): "
                     f"{limit['pipeline_images_per_s']:.0f} images/s (model alone {limit['model_images_per_s']:.0f}); "
                     f"TorchServe's best round answered {best['requests_per_s']:.0f}/s, **{share:.0%}** of it "
                     f"(target {CEILING_TARGET:.0%}: **{'met' if share >= CEILING_TARGET else 'not met'}**).")
        server_cores = (best["cpu_cores"] or {}).get("server")
        per_cpu = max(ceiling.get("pipeline_images_per_cpu_s", 0.0) for ceiling in report["ceilings"])
        if server_cores and per_cpu:
            served_per_core = best["requests_per_s"] / server_cores
            lines.append(f"- Per busy core: TorchServe's processes (frontend and "
                         f"workers) kept {server_cores:.2f} cores busy in that round, {served_per_core:.0f} answers per "
                         f"core-second, against the in-process pipeline's {per_cpu:.0f} images per CPU-second: "
                         f"**{served_per_core / per_cpu:.0%}**.")
    return lines


def peers_markdown(report: dict[str, Any], data_file: str) -> str:
    plan = report["plan"]
    targets = target_lines(report)
    peers = any(run["kind"] != "torchserve" for run in report["runs"])
    return "\n".join([
        "# TorchServe against its peers" if peers else "# TorchServe settings side by side",
        "",
        f"Generated by `python -m loadtest peers` on {report['date']}; the raw data is in [{data_file}]({data_file}). "
        "Do not edit by hand: rerun the command.",
        "",
        f"**Machine:** {machine_line(report['machine'])}. The shipped TorchServe's plan on it: {plan['cores']} core(s), "
        f"{plan['default_workers']} worker(s) x {plan['threads']} thread(s) for the default model (docs/SERVING.md).",
        "",
        "## Per server (all rounds)",
        "",
        *summary_table(report),
        "",
        *(["## Target", "", *targets, ""] if targets else []),
        "## Per round",
        "",
        *round_table(report),
        *error_lines(report),
        "",
        "## Setup",
        "",
        f"- Every server serves `{report['archive']}` through the archive's own handler; TorchServe with "
        "config.properties and the plan above, every archive of its model store loaded; a `torchserve:key=value` row "
        "changes one setting.",
        f"- Locust: {report['users']} closed-loop users, one CIFAR-10 test PNG per request from a pool of "
        f"{report['image_pool']}, {report['warm_up_s']} s of warm-up, {report['run_time_s']} s measured; each server alone, "
        f"{rounds_done(report)} round(s), the order reversed every other round.",
        "- What goodput, cores and the ceiling mean, and why Locust shares the cores: "
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
