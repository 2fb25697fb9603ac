"""Paper-scale simulation: the real scheduler and policies on a simulated engine + virtual clock.

    python -m adaserve_jax.sim --profile paper-llama70b|local|PROFILE.json
        --workload TRACE.json [--workload TRACE2.json ...] [--policy NAME ...]
        [--num-requests N] [--max-output-len L] [--time-scale X | --time-scales X ...]
        [--calibration FILE] [--max-batch B] [--token-budget T] [--prefill-chunk C]
        [--prefill-floor F]
        [--tokenizer FILE --max-prompt-len P] --json OUT.json --plot OUT.png

Writes the real bench's JSON schema (`baseline_tpot_ms`, `settings`, `sweep`, and for a single
load point `policies`); several workloads or time scales make a load sweep whose plot shows
attainment and goodput vs offered load, one line per policy (the paper's Figures 8 and 9).
Input (profile, calibration, workloads, policies) is validated before anything runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from adaserve_jax.bench.cli import positive
from adaserve_jax.bench.workload import WorkloadError, arrival_times_s, load_workload, take
from adaserve_jax.scheduler.policy import parse_policy
from adaserve_jax.sim.calibration import CalibrationError, load_calibration
from adaserve_jax.sim.profiles import ProfileError, load_profile
from adaserve_jax.sim.replay import SimSettings, build_requests, simulate, tokenized_lengths

DEFAULT_POLICIES = ("autoregressive", "sarathi", "spec:4", "tree:4,2", "adaserve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m adaserve_jax.sim", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--profile", required=True, help="paper-llama70b, local, or a profile JSON")
    ap.add_argument("--workload", action="append", required=True, help="trace JSON; repeatable")
    ap.add_argument("--policy", action="append", dest="policies")
    ap.add_argument("--num-requests", type=positive(int), default=None, help="first N arrivals")
    ap.add_argument("--max-output-len", type=positive(int), default=256)
    ap.add_argument("--time-scale", type=positive(float), default=1.0)
    ap.add_argument("--time-scales", type=positive(float), nargs="+", default=None)
    ap.add_argument("--calibration", default=None, help="calibration JSON (default: shipped)")
    ap.add_argument("--max-batch", type=positive(int), default=128)
    ap.add_argument("--token-budget", type=positive(int), default=1024)
    ap.add_argument("--prefill-chunk", type=positive(int), default=512)
    ap.add_argument(
        "--prefill-floor",
        type=int,
        default=0,
        help="adaserve: tokens per step kept for waiting prompts before candidate trees",
    )
    ap.add_argument(
        "--no-slo-pacing",
        dest="slo_pacing",
        action="store_false",
        help="adaserve: every decoding request rides in every step (scheduler/pacing.py)",
    )
    ap.add_argument("--max-len", type=positive(int), default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="use real prompt token counts")
    ap.add_argument("--max-prompt-len", type=positive(int), default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--quiet", action="store_true")
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


def _line(policy: str, s: dict) -> str:
    cats = ", ".join(f"{c} {v['attainment']:.1%}" for c, v in s["per_category"].items())
    return (
        f"  {policy:<15} attainment {s['attainment']:.1%} ({cats}); goodput "
        f"{s['goodput_tokens_per_s']:.0f} tok/s; accepted/step {s['mean_accepted_per_step']:.2f}; "
        f"decode batch {s['mean_decode_batch']:.1f}; selection {s['selection_overhead']:.3%}, "
        f"host {s['host_overhead']:.2%} of iteration; {s['sim_seconds']:.1f} s"
    )


def run(args: argparse.Namespace) -> dict:
    try:
        profile = load_profile(args.profile)
        calibration = load_calibration(args.calibration)
        traces = [(w, take(load_workload(w), args.num_requests)) for w in args.workload]
        settings = SimSettings(
            max_batch=args.max_batch,
            token_budget=args.token_budget,
            prefill_chunk=args.prefill_chunk,
            prefill_floor=args.prefill_floor,
            slo_pacing=args.slo_pacing,
            max_len=args.max_len,
            seed=args.seed,
        )
    except (ProfileError, CalibrationError, WorkloadError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    log = (lambda *a, **k: None) if args.quiet else print
    scales = args.time_scales or [args.time_scale]
    t0 = time.perf_counter()
    sweep = []
    for workload, entries in traces:
        lengths = None
        if args.tokenizer:
            lengths = tokenized_lengths(
                entries,
                args.tokenizer,
                max_len=args.max_len,
                max_output_len=args.max_output_len,
                max_prompt_len=args.max_prompt_len,
            )
        requests = build_requests(
            entries,
            profile.baseline_tpot_ms,
            max_output_len=args.max_output_len,
            max_len=args.max_len,
            prompt_lengths=lengths,
            max_prompt_len=args.max_prompt_len,
        )
        for scale in scales:
            arrivals = arrival_times_s(entries, profile.baseline_tpot_ms, scale)
            point = {"workload": str(workload), "time_scale": scale, "policies": {}}
            log(f"{Path(workload).name} x{scale:g} ({len(entries)} requests):", flush=True)
            for policy in args.policies:
                res = simulate(profile, calibration, policy, requests, arrivals, settings)
                point["policies"][policy] = res.summary
                point["offered_rps"] = res.summary["offered_rps"]
                log(_line(policy, res.summary), flush=True)
            sweep.append(point)
    result = {
        "baseline_tpot_ms": profile.baseline_tpot_ms,
        "simulated": True,
        "settings": {
            "profile": profile.name,
            "profile_file": profile.source,
            "calibration": calibration.path,
            "workload": ", ".join(Path(w).name for w in args.workload),
            "workloads": [str(w) for w in args.workload],
            "policies": args.policies,
            "num_requests": max(len(e) for _, e in traces),
            "max_output_len": args.max_output_len,
            "time_scales": scales,
            "max_batch": settings.max_batch,
            "token_budget": settings.token_budget,
            "prefill_chunk": settings.prefill_chunk,
            "prefill_floor": settings.prefill_floor,
            "slo_pacing": settings.slo_pacing,
            "max_len": settings.max_len,
            "seed": settings.seed,
            "tokenizer": args.tokenizer,
            "max_prompt_len": args.max_prompt_len,
            "sim_seconds": time.perf_counter() - t0,
        },
        "sweep": sweep,
    }
    if len(sweep) == 1:
        result["time_scale"] = sweep[0]["time_scale"]
        result["offered_rps"] = sweep[0]["offered_rps"]
        result["policies"] = sweep[0]["policies"]
    log(f"simulated in {result['settings']['sim_seconds']:.1f} s")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    if args.plot:
        from adaserve_jax.bench.plots import plot_run
        from adaserve_jax.sim.plots import plot_load_sweep

        path = plot_load_sweep(result, args.plot) if len(sweep) > 1 else plot_run(result, args.plot)
        log(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


def run_from_bench_args(bench: argparse.Namespace) -> dict:
    """`python -m adaserve_jax.bench --simulate PROFILE ...`: the bench's own arguments
    (workload, policies, request/output caps, time scales, sizing, outputs) on the simulator."""
    argv = ["--profile", bench.simulate, "--workload", str(bench.workload)]
    for name in bench.policies:
        argv += ["--policy", name]
    argv += ["--num-requests", str(bench.num_requests)]
    argv += ["--max-output-len", str(bench.max_output_len), "--max-batch", str(bench.max_batch)]
    if bench.time_scales:
        argv += ["--time-scales", *map(str, bench.time_scales)]
    else:
        argv += ["--time-scale", str(bench.time_scale)]
    if bench.token_budget:
        argv += ["--token-budget", str(bench.token_budget)]
    if bench.max_prompt_len:
        argv += ["--max-prompt-len", str(bench.max_prompt_len)]
    if not bench.slo_pacing:
        argv += ["--no-slo-pacing"]
    if bench.json_out:
        argv += ["--json", str(bench.json_out)]
    if bench.plot:
        argv += ["--plot", str(bench.plot)]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main() and 0)
