"""Replay the AdaServe paper's multi-SLO traces against every scheduling policy.

    python -m adaserve_jax.bench --workload TRACE.json [--policy NAME ...]
        [--num-requests N] [--max-output-len L] [--time-scale X | --time-scales X ...]
        [--json OUT.json] [--plot OUT.png]

All policies run one after another on one warmed engine. With `--time-scales` every
policy runs at every scale (a load sweep) and the plot shows attainment and goodput
vs offered load; with one `--time-scale` the plot shows attainment per category.
Input is validated before any model is loaded. The JSON schema is in README.md
("Multi-SLO benchmark").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from adaserve_jax.bench.cli import positive
from adaserve_jax.bench.replay import SWEEP_ORDERS
from adaserve_jax.bench.workload import WorkloadError, load_workload, take
from adaserve_jax.scheduler.policy import parse_policy

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICIES = ("autoregressive", "sarathi", "spec:2", "tree:2,2", "adaserve")


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"bucket sizes must be positive, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m adaserve_jax.bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--workload", required=True, help="trace JSON (AdaServe artifact format)")
    ap.add_argument(
        "--policy",
        action="append",
        dest="policies",
        help=f"repeatable; default: {' '.join(DEFAULT_POLICIES)}",
    )
    ap.add_argument("--num-requests", type=positive(int), default=50, help="first N arrivals")
    ap.add_argument("--max-output-len", type=positive(int), default=64)
    ap.add_argument(
        "--max-prompt-len", type=positive(int), default=None, help="truncate prompts further"
    )
    ap.add_argument("--time-scale", type=positive(float), default=1.0)
    ap.add_argument(
        "--time-scales", type=positive(float), nargs="+", default=None, help="load sweep"
    )
    ap.add_argument("--json", dest="json_out", default=None, help="write results here")
    ap.add_argument("--plot", default=None, help="write a PNG here")
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument("--max-batch", type=positive(int), default=8)
    ap.add_argument("--token-buckets", type=_ints, default=None, help="e.g. 1,4,16,64")
    ap.add_argument("--ctx-buckets", type=_ints, default=None, help="e.g. 64,256")
    ap.add_argument("--token-budget", type=positive(int), default=None)
    ap.add_argument(
        "--baseline",
        choices=("profile", "measured", "per-load", "per-round", "per-run"),
        default="profile",
        help="baseline TPOT scaling SLOs and arrivals: the engine's start-up profile, or one "
        "request served alone through the scheduler right before the sweep (measured; includes "
        "host overhead and current machine load), or right before each time scale (per-load: "
        "the median of 7 probes; every policy at that load gets the same SLOs and arrivals), "
        "or right before each round of a load (per-round: the median of 7 probes; every "
        "policy in that round gets the same SLOs and arrivals, with --repeats), "
        "or right before every policy's replay (per-run: each replay's SLOs and arrivals "
        "follow the machine's speed as it ran)",
    )
    ap.add_argument(
        "--repeats",
        type=positive(int),
        default=1,
        help="replay every policy this many times per load, taking turns (--order), and pool "
        "each policy's rounds: steadier against a drifting machine",
    )
    ap.add_argument(
        "--order",
        choices=SWEEP_ORDERS,
        default="alternate",
        help="with --repeats: alternate = ABC CBA ... (the last policy's rounds back to back); "
        "cycle = ABC ABC ... (every policy's rounds equally far apart); rotate = ABC BCA CAB "
        "... (each round starts one policy later: no policy always runs first after a "
        "per-load or per-round baseline)",
    )
    ap.add_argument("--reprofile", action="store_true", help="measure the latency profile again")
    ap.add_argument(
        "--no-slo-pacing",
        dest="slo_pacing",
        action="store_false",
        help="adaserve: every decoding request rides in every step (scheduler/pacing.py)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--simulate", metavar="PROFILE", help="simulated engine (SIMULATION.md)")
    args = ap.parse_args(argv)
    args.policies = args.policies or list(DEFAULT_POLICIES)
    for name in args.policies:
        try:
            parse_policy(name)
        except ValueError as exc:
            ap.error(str(exc))
    if len(set(args.policies)) != len(args.policies):
        ap.error(f"duplicate --policy in {args.policies}")
    return args


def _read_profile(engine) -> dict | None:
    """The engine's cached latency profile (verify/draft ms per bucket), if readable."""
    path = getattr(engine, "profile_path", None)
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.simulate:  # paper-scale simulation on a virtual clock: same args, same JSON
        from adaserve_jax.sim.__main__ import run_from_bench_args

        return run_from_bench_args(args)
    try:
        entries = take(load_workload(args.workload), args.num_requests)
    except WorkloadError as exc:
        raise SystemExit(f"error: {exc}") from None
    progress = not args.no_progress

    from adaserve_jax import Engine, load_model

    speculative = any(parse_policy(p).speculative for p in args.policies)
    try:
        target = load_model(args.target)
        draft = load_model(args.draft) if speculative else None
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    kwargs = {}
    if args.token_buckets:
        kwargs["token_buckets"] = args.token_buckets
    if args.ctx_buckets:
        kwargs["ctx_buckets"] = args.ctx_buckets
    t0 = time.perf_counter()
    engine = Engine(
        target,
        draft,
        max_batch=args.max_batch,
        token_budget=args.token_budget,
        policy=args.policies[0],
        policies=args.policies[1:],
        reprofile=args.reprofile,
        progress=progress,
        **kwargs,
    )
    if engine.latency_profile is None:
        engine.run_profile(reprofile=args.reprofile, progress=progress)
    engine.slo_pacing = args.slo_pacing
    print(
        f"engine ready in {time.perf_counter() - t0:.1f} s; baseline TPOT "
        f"{engine.baseline_tpot_ms:.2f} ms; SLOs (ms): "
        + ", ".join(
            f"{c} {engine.category_slo_ms(c):.1f}" for c in ("coding", "chat", "summarization")
        ),
        flush=True,
    )

    from adaserve_jax.bench.replay import build_requests, measure_baseline_tpot_ms, run_sweep

    def requests_for(b: float) -> list:  # the trace's requests, SLOs scaled by baseline b
        return build_requests(
            engine,
            entries,
            max_output_len=args.max_output_len,
            max_prompt_len=args.max_prompt_len,
            baseline_tpot_ms=b,
        )

    baseline = engine.baseline_tpot_ms
    try:
        if args.baseline != "profile":  # measured, or per load / round / run
            probe = build_requests(
                engine, entries[:1], max_output_len=32, max_prompt_len=args.max_prompt_len
            )[0]
            baseline = measure_baseline_tpot_ms(engine, probe)
            print(
                f"measured baseline TPOT {baseline:.2f} ms "
                f"(profile: {engine.baseline_tpot_ms:.2f} ms)",
                flush=True,
            )
        requests = requests_for(baseline)
    except ValueError as exc:
        raise SystemExit(f"error: {args.workload}: {exc}") from None
    scales = args.time_scales or [args.time_scale]
    settings = _settings(args, engine, len(entries), scales, speculative)

    def save(points: list[dict]) -> dict:
        result = {"baseline_tpot_ms": baseline, "settings": settings}
        result["sweep"] = points
        if len(scales) == 1 and points:
            result["time_scale"] = points[0]["time_scale"]
            result["offered_rps"] = points[0]["offered_rps"]
            result["policies"] = points[0]["policies"]
        if args.json_out:
            out = Path(args.json_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    settings["baseline"] = args.baseline
    settings["profile_baseline_tpot_ms"] = engine.baseline_tpot_ms
    settings["repeats"] = args.repeats
    settings["order"] = args.order
    per_run = {}
    if args.baseline.startswith("per-"):
        every = args.baseline.removeprefix("per-")
        # a load's or a round's SLOs stand for minutes of replays, a run's for one
        probes = 3 if every == "run" else 7

        def rebaseline() -> float:
            b = measure_baseline_tpot_ms(engine, probe, repeats=probes)
            print(f"baseline TPOT {b:.2f} ms", flush=True)
            return b

        per_run = {
            "rebaseline": rebaseline,
            "requests_for": requests_for,
            "rebaseline_every": every,
        }
    sweep = run_sweep(
        engine,
        entries,
        requests,
        args.policies,
        scales,
        baseline_tpot_ms=baseline,
        progress=progress,
        on_run=save,
        repeats=args.repeats,
        order=args.order,
        **per_run,
    )
    result = save(sweep)
    if args.json_out:
        print(f"wrote {args.json_out}")
    if args.plot:
        from adaserve_jax.bench.plots import plot_run, plot_sweep

        path = plot_sweep(result, args.plot) if len(sweep) > 1 else plot_run(result, args.plot)
        print(f"wrote {path}")
    return result


def _settings(args, engine, num_requests: int, scales, speculative: bool) -> dict:
    return {
        "workload": str(args.workload),
        "policies": args.policies,
        "num_requests": num_requests,
        "max_output_len": args.max_output_len,
        "max_prompt_len": args.max_prompt_len,
        "time_scales": list(scales),
        "target": str(args.target),
        "draft": str(args.draft) if speculative else None,
        "max_batch": args.max_batch,
        "token_budget": engine.token_budget,
        "token_buckets": list(engine.target.token_buckets),
        "ctx_buckets": list(engine.target.ctx_buckets),
        "max_len": engine.max_len,
        "slo_pacing": args.slo_pacing,
        "latency_profile": _read_profile(engine),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    sys.exit(main() and 0)
