"""``python -m loadtest.experiments.jit_warmup``: the frontend's CPU per answer, thread by thread, over the
first minutes of load on a fresh TorchServe (docs/SERVING.md, "Where TorchServe's extra CPU per request goes").

    python -m loadtest.experiments.jit_warmup --windows 8 --seconds 15
    python -m loadtest.experiments.jit_warmup --vmargs=-XX:TieredStopAtLevel=1    # C1 only: no C2 compiler

TorchServe as shipped (the serve-time plan, every archive), ``--vmargs`` added to the shipped ones, then
back-to-back wrk windows, each measured as ``make profile`` measures its windows
(``loadtest.cpu_profile.measure_window``); each prints answers/s, p99, the JVM's CPU per answer and
its three busiest kinds of thread, read from /proc (the JIT compiler's threads are invisible to JFR).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.tokens import bearer, read_key_file
from loadtest.cpu_profile import measure_window
from loadtest.images import test_images
from loadtest.peers import wrk
from loadtest.run import bounded, check_data_dir
from server.config import REPO_ROOT, free_port_overrides, read_properties
from server.launcher import TorchServe
from server.plan import plan_from_environment
from training.data import default_data_dir


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.experiments.jit_warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmargs", default="", help="JVM options added to config.properties' vmargs")
    parser.add_argument("--windows", type=bounded(1, 100), default=8, help="wrk windows, back to back (default: 8)")
    parser.add_argument("--seconds", type=bounded(5, 600), default=15, help="seconds per window (default: 15)")
    parser.add_argument("--connections", type=bounded(1, 1000), default=16, help="wrk's connections (default: 16)")
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--port-base", type=int, default=18360)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "jit_warmup")
    return parser


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_data_dir(parser, args.data_dir)
    if not wrk.available():
        parser.error("wrk not found: install it (apt-get install wrk)")
    overrides = free_port_overrides(args.port_base)
    overrides["vmargs"] = f"{read_properties()['vmargs']} {args.vmargs}".strip()
    server = TorchServe(workdir=args.output_dir / "torchserve", model_store=args.model_store, overrides=overrides,
                        plan=plan_from_environment())
    server.start(wait_for=sorted(path.stem for path in args.model_store.glob("*.mar")), timeout=300)
    try:
        processes = server.processes()
        (frontend,) = [process for process in processes if process.name() == "java"]
        headers = {"Content-Type": "image/png"} | bearer(read_key_file(server.workdir / "key_file.json")["inference"])
        script = wrk.write_script(list(test_images(args.data_dir, 256)[0]), headers, args.output_dir / "wrk")
        for window in range(1, args.windows + 1):
            result = measure_window(server.inference_url, script, args, frontend,
                                    [process for process in processes if process is not frontend],
                                    args.output_dir / "wrk.log")
            top = ", ".join(f"{name} {ms:.3f}" for name, ms in list(result["frontend_threads_ms_per_answer"].items())[:3])
            print(f"[{args.vmargs or 'shipped vmargs'}] window {window} ({(window - 1) * args.seconds}-"
                  f"{window * args.seconds} s): {result['answers_per_s']:.1f} answers/s, p99 {result['latency_ms']['p99']} ms, "
                  f"frontend {result['cpu_ms_per_answer'].get('frontend', float('nan')):.3f} ms CPU per answer ({top})",
                  flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
