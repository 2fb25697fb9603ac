"""Validate the simulator against a real bench run: same trace, load, sizing and policies.

    python -m adaserve_jax.sim.validate BENCH.json [--profile local|FILE|bench]
        [--host-ms MS|measured] [--speed profile|measured|cell|cell-time|trace]
        [--speed-scale X] [--trace-of POLICY] [--jitter FILE|local|cell] [--jitter-corr-ms MS]
        [--tokenizer checkpoints/tokenizer.json] [--calibration FILE] [--json OUT.json]

Reads the real bench's JSON (`python -m adaserve_jax.bench ... --json`), replays the same
workload (first `num_requests` arrivals, `max_output_len`, prompts tokenized and truncated
as the bench truncates them, every time scale) with the same `max_batch` and token budget on
the simulated engine, and prints the gap in attainment (percentage points) and goodput (%)
per policy and load. `--profile bench` (the default) uses the latency profile the real run
recorded in its settings, so the comparison isolates the simulator's model of acceptance and
scheduling from profile drift; `--profile local` uses the shipped local profile.
`--host-ms measured` adds to every simulated iteration the scheduler Python the real run
measured for that policy and load (`host_ms_per_iteration`, iteration wall time outside the
engine's device calls), instead of one constant for every policy. `--speed measured` scales
the bench profile's device latencies by the run's measured baseline TPOT over the profile's
(`--baseline measured` runs: how much slower or faster the machine was when the replay began
than when the profile was taken; 1.19x in a run whose profile said 3.85 ms and whose lone
request then took 4.57 ms). `--speed cell` scales them, per policy and load, by that replay's
own `verify_speed` (the median of its verify calls' wall time over the profile's price of
their bucket), and the draft's step and expansion latencies by its `draft_speed` and
`expand_speed` (the same ratio for those calls, where the bench recorded them; else
`verify_speed`): the machine's speed drifts by tens of percent between minutes, and the
kinds of call do not slow alike, so this compares the simulator with each replay at the speed
the machine ran each of its calls. `--speed cell-time` does the same with the time-weighted
ratios (`{kind}_time_ratio`: the calls' summed wall time over their summed price, which is what
scales a replay's total device time; a median ignores its slow tail). `--speed trace` replays
every round of a cell with that round's per-second `speed_trace` (sim/engine.py `SpeedTrace`):
a simulated call that begins in second s of the run costs its price times the real calls'
ratio in second s, so a slow phase in the middle of a real replay slows the same stretch of
the simulated one. The speeds are inputs (how fast the machine was), the outcomes compared
(attainment, goodput) are not. `--speed-scale X` multiplies every device latency by X on top
of the chosen speeds: how the outcomes would have moved had the machine run X times slower
(a sensitivity check, SIMULATION.md). `--trace-of POLICY` (with `--speed trace`) replays every
policy at that one policy's per-second speeds, so the policies compare on the same machine
minute (a what-if for comparing schedulers, not a validation of the other policies' cells).
`--jitter` adds what a per-second trace averages away: every simulated call also draws its
own scatter around its second's speed from a real sample (sim/jitter.py), so a simulated
second holds the real mix of fast steps and slow outliers, which SLO pacing reacts to.
Those outliers come in spells on the real machine: `--jitter cell` draws with each replay's
recorded memory (`speed_corr_ms`, bench/speed_memory.py; a latent that decays with that time
constant, `SpeedJitter(corr_ms)`), independently where none was recorded; `--jitter-corr-ms
MS` sets one for every cell (0: independent draws).

Every row also records each seed's attainment (`sim_attainment_seeds`), and the summary the
gap a perfect simulator would still show against one real run if the real run scattered as
much as the seeds do (`noise_floor_pp`, `noise_floor_pp()`). Repeats of one bench command
are compared on their means by `python -m adaserve_jax.sim.pool` (sim/pool.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from adaserve_jax.bench.cli import positive
from adaserve_jax.bench.workload import arrival_times_s, load_workload, take
from adaserve_jax.sim.calibration import load_calibration
from adaserve_jax.sim.engine import SpeedJitter, SpeedTrace
from adaserve_jax.sim.jitter import LOCAL_JITTER
from adaserve_jax.sim.profiles import load_profile, parse_profile
from adaserve_jax.sim.replay import SimSettings, build_requests, simulate, tokenized_lengths

ROOT = Path(__file__).resolve().parents[2]


def _scaled(table, speed: float):
    """A {count: ms} table (or {shape: {rows: ms}}) with every latency times `speed`."""
    if table is None:
        return None
    return {k: (_scaled(v, speed) if isinstance(v, dict) else v * speed) for k, v in table.items()}


def _bench_profile(
    settings: dict,
    host_ms: float = 0.0,
    source: str = "bench JSON",
    speed: float = 1.0,
    draft_speed: float | None = None,
    expand_speed: float | None = None,
):
    """The profile the real run recorded, its verify latencies times `speed` and the draft's
    step and expansion latencies times their own speeds (`speed` where None)."""
    prof = settings.get("latency_profile")
    if not prof:
        raise SystemExit("error: the bench JSON records no latency_profile; use --profile local")
    data = {
        "name": "bench",
        "verify_ms": _scaled(prof["verify_ms"], speed),
        "draft_ms": _scaled(prof.get("draft_ms"), draft_speed or speed),
        "expand_ms": _scaled(prof.get("expand_ms"), expand_speed or speed),
        "baseline_tpot_ms": prof["baseline_tpot_ms"],
        "pad_to_buckets": True,
        "expand_rows": "all",
        "host_ms": host_ms,
    }
    return parse_profile(data, f"{source}: settings.latency_profile")


def _non_negative(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return x


def gap_summary(rows: list[dict]) -> dict:
    """Per policy and over all rows ("all"): the mean absolute attainment gap (pp), the points
    within 5 pp and the number of points."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["policy"], []).append(abs(r["attainment_gap_pp"]))
    groups["all"] = [g for v in list(groups.values()) for g in v]
    return {
        name: {
            "mean_abs_gap_pp": sum(g) / len(g),
            "within_5pp": sum(x <= 5.0 for x in g),
            "points": len(g),
        }
        for name, g in groups.items()
        if g
    }


def noise_floor_pp(rows: list[dict], seeds: int) -> dict:
    """Per policy and overall: the mean |attainment gap| (pp) a simulator that models the
    real engine exactly would still show against one real run, were the real run's sampling
    scatter (which requests' acceptance draws go well) the simulator's own seed-to-seed
    scatter. A real run is one draw, the simulator the mean of `seeds` draws, so for normal
    scatter with standard deviation sd their gap has E|gap| = sd * sqrt(1 + 1/seeds) *
    sqrt(2/pi). Needs >= 2 seeds; rows without `sim_attainment_seeds` are left out."""
    if seeds < 2:
        return {}
    groups: dict[str, list[float]] = {}
    for r in rows:
        xs = r.get("sim_attainment_seeds") or []
        if len(xs) >= 2:
            sd = float(np.std(xs, ddof=1))
            e_gap = 100 * sd * math.sqrt((1 + 1 / len(xs)) * 2 / math.pi)
            groups.setdefault(r["policy"], []).append(e_gap)
    groups["all"] = [g for v in list(groups.values()) for g in v]
    return {name: sum(g) / len(g) for name, g in groups.items() if g}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.validate")
    ap.add_argument("bench_json")
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--tokenizer", default=str(ROOT / "checkpoints" / "tokenizer.json"))
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--seeds", type=int, default=3, help="simulator seeds averaged")
    ap.add_argument(
        "--host-ms",
        default="0",
        help="host time per iteration added to the bench profile (the real engine's Python): "
        "ms, or 'measured' = each real run's own `host_ms_per_iteration`",
    )
    ap.add_argument(
        "--speed",
        choices=("profile", "measured", "cell", "cell-time", "trace"),
        default="profile",
        help="measured: scale the bench profile's latencies by measured / profile baseline "
        "TPOT; cell: by each policy and load's own `verify_speed`, `draft_speed` and "
        "`expand_speed` (each kind of call's median wall time over the profile's price); "
        "cell-time: by its time-weighted `*_time_ratio`; trace: every round by its "
        "per-second `speed_trace`",
    )
    ap.add_argument(
        "--speed-scale",
        type=positive(float),
        default=1.0,
        help="multiply every device latency by this factor on top of --speed (sensitivity)",
    )
    ap.add_argument(
        "--trace-of",
        default=None,
        metavar="POLICY",
        help="with --speed trace: replay every policy at this policy's per-second speeds",
    )
    ap.add_argument(
        "--jitter",
        default=None,
        metavar="FILE|local|cell",
        help="scatter every simulated device call around its speed by a real machine's "
        "sample (JSON {kind: [ratio, ...]}: calls' wall time over price, each over its "
        "second's ratio; sim/engine.py SpeedJitter, sim/jitter.py), 'local': this machine's "
        "(adaserve_jax/sim/jitter_local.json), or 'cell': each replay's own `speed_scatter`",
    )
    ap.add_argument(
        "--jitter-corr-ms",
        type=_non_negative,
        default=None,
        metavar="MS",
        help="with --jitter: the scatter's memory, a time constant in ms (SpeedJitter "
        "corr_ms; 0: independent draws). Default: with --jitter cell each replay's own "
        "`speed_corr_ms` where the bench recorded it, else 0",
    )
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    if args.jitter_corr_ms is not None and args.jitter is None:
        ap.error("--jitter-corr-ms needs --jitter")
    jitter, corr_ms = None, args.jitter_corr_ms or 0.0
    if args.jitter is not None and args.jitter != "cell":
        jitter_path = LOCAL_JITTER if args.jitter == "local" else Path(args.jitter)
        try:
            jitter = SpeedJitter(json.loads(jitter_path.read_text()), corr_ms=corr_ms)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise SystemExit(f"error: --jitter {jitter_path}: {exc}") from None
    scale = args.speed_scale
    real = json.loads(Path(args.bench_json).read_text())
    st = real["settings"]
    measured_host = args.host_ms == "measured"
    if measured_host and args.profile != "bench":
        ap.error("--host-ms measured needs --profile bench")
    try:
        host_ms = 0.0 if measured_host else float(args.host_ms)
    except ValueError:
        ap.error(f"--host-ms {args.host_ms!r}: expected a number of ms or 'measured'")
    speed, draft_speed, expand_speed = 1.0, None, None
    if args.speed == "measured":
        if args.profile != "bench" or st.get("baseline") != "measured":
            ap.error("--speed measured needs --profile bench and a --baseline measured run")
        speed = real["baseline_tpot_ms"] / st["profile_baseline_tpot_ms"]
    per_cell = args.speed in ("cell", "cell-time")
    traced = args.speed == "trace"
    if (per_cell or traced) and args.profile != "bench":
        ap.error(f"--speed {args.speed} needs --profile bench")
    if args.trace_of is not None:
        if not traced:
            ap.error("--trace-of needs --speed trace")
        known = sorted({name for point in real["sweep"] for name in point["policies"]})
        if args.trace_of not in known:
            ap.error(f"--trace-of {args.trace_of!r}: the run has policies {known}")
    suffix = "_time_ratio" if args.speed == "cell-time" else "_speed"
    if scale != 1.0 and args.profile != "bench":
        ap.error("--speed-scale needs --profile bench")
    if args.profile == "bench":
        profile = _bench_profile(st, host_ms, args.bench_json, speed * scale)
    else:
        profile = load_profile(args.profile)
    baseline = real["baseline_tpot_ms"]
    cal = load_calibration(args.calibration)
    entries = take(load_workload(st["workload"]), st["num_requests"])
    max_len = int(st.get("max_len") or 1024)
    lengths = tokenized_lengths(
        entries,
        args.tokenizer,
        max_len=max_len,
        max_output_len=st["max_output_len"],
        max_prompt_len=st.get("max_prompt_len"),
    )

    def requests_at(b: float):  # the replay's requests: SLOs the categories' multiples of b
        return build_requests(
            entries, b, max_output_len=st["max_output_len"], max_len=max_len,
            prompt_lengths=lengths,
        )  # fmt: skip

    requests = requests_at(baseline)
    rows = []
    for point in real["sweep"]:
        # `--baseline per-load` benches: each load had its own baseline (SLOs, arrivals)
        b = point.get("baseline_tpot_ms", baseline)
        arrivals = arrival_times_s(entries, b, point["time_scale"])
        point_requests = requests if b == baseline else requests_at(b)
        for policy, rs in point["policies"].items():
            # `--baseline per-run` / `per-round` benches: every round had its own baseline
            rounds = [(point_requests, arrivals)]
            if isinstance(rs.get("baseline_tpot_ms"), list):
                rounds = [
                    (requests_at(b), arrival_times_s(entries, b, point["time_scale"]))
                    for b in rs["baseline_tpot_ms"]
                ]
            if args.trace_of is not None:  # the speeds of another policy's replays
                other = point["policies"].get(args.trace_of, {})
                rs = {**rs, "speed_trace": other.get("speed_trace")}
            needs = f"verify{suffix}" if per_cell else "speed_trace" if traced else None
            if needs and rs.get(needs) is None:
                source = args.trace_of or policy  # whose cell should have recorded it
                raise SystemExit(
                    f"error: {args.bench_json}: {source} at x{point['time_scale']} records "
                    f"no {needs} (re-run the bench)"
                )
            if per_cell:
                speed = rs[f"verify{suffix}"]
                # the draft's calls at their own measured speeds (benches that recorded them)
                draft_speed, expand_speed = rs.get(f"draft{suffix}"), rs.get(f"expand{suffix}")
                profile = _bench_profile(
                    st, host_ms, args.bench_json, speed * scale,
                    draft_speed and draft_speed * scale, expand_speed and expand_speed * scale,
                )  # fmt: skip
            traces: list[SpeedTrace | None] = [None] * len(rounds)
            if traced:
                per_round = rs["speed_trace"]
                n_rounds = len(per_round["verify"])
                if len(rounds) == 1:
                    rounds = rounds * n_rounds
                if n_rounds != len(rounds):
                    raise SystemExit(
                        f"error: {args.bench_json}: {policy} at x{point['time_scale']}: "
                        f"speed_trace has {n_rounds} rounds, the cell {len(rounds)}"
                    )
                try:
                    traces = [
                        SpeedTrace({kind: rows_[i] for kind, rows_ in per_round.items()})
                        for i in range(n_rounds)
                    ]
                except (ValueError, TypeError, IndexError, KeyError) as exc:
                    raise SystemExit(
                        f"error: {args.bench_json}: {policy} at x{point['time_scale']}: "
                        f"field speed_trace: {exc}"
                    ) from None
            if args.jitter == "cell":
                scatter = {k: v for k, v in (rs.get("speed_scatter") or {}).items() if v}
                corr_ms = args.jitter_corr_ms
                if corr_ms is None:  # the replay's own memory, where the bench measured it
                    corr_ms = rs.get("speed_corr_ms") or 0.0
                    if not (isinstance(corr_ms, int | float) and 0 <= corr_ms < math.inf):
                        raise SystemExit(
                            f"error: {args.bench_json}: {policy} at x{point['time_scale']}: "
                            f"field speed_corr_ms: {corr_ms!r} must be a number >= 0"
                        )
                try:
                    jitter = SpeedJitter(scatter, corr_ms=corr_ms)
                except ValueError as exc:
                    raise SystemExit(
                        f"error: {args.bench_json}: {policy} at x{point['time_scale']}: field "
                        f"speed_scatter: {exc} (re-run the bench, or --jitter FILE)"
                    ) from None
            if measured_host:
                if rs.get("host_ms_per_iteration") is None:
                    raise SystemExit(
                        f"error: {args.bench_json}: {policy} at x{point['time_scale']} records "
                        "no host_ms_per_iteration (re-run the bench)"
                    )
                profile = dataclasses.replace(profile, host_ms=rs["host_ms_per_iteration"])
            sims = []
            for seed in range(args.seeds):
                settings = SimSettings(
                    max_batch=st["max_batch"], token_budget=st["token_budget"], prefill_chunk=64,
                    max_len=max_len, seed=seed,
                    # runs recorded before SLO pacing existed ran without it
                    slo_pacing=bool(st.get("slo_pacing", False)),
                )  # fmt: skip
                for (reqs, arr), trace in zip(rounds, traces, strict=True):
                    run = simulate(profile, cal, policy, reqs, arr, settings, trace, jitter)
                    sims.append(run.summary)
            att = sum(s["attainment"] for s in sims) / len(sims)
            # each seed's attainment over its rounds (rounds hold equal request counts)
            per_seed = [
                sum(s["attainment"] for s in sims[i : i + len(rounds)]) / len(rounds)
                for i in range(0, len(sims), len(rounds))
            ]
            good = sum(s["goodput_tokens_per_s"] for s in sims) / len(sims)
            acc = sum(s["mean_accepted_per_step"] for s in sims) / len(sims)
            # a pooled real entry sums its rounds' wall time
            wall = sum(s["wall_s"] for s in sims) / len(sims) * (rs.get("repeats") or 1)
            tpot = sum(s["tpot_p50_ms"] or 0.0 for s in sims) / len(sims)
            row = {
                "policy": policy,
                "time_scale": point["time_scale"],
                "sim_host_ms": profile.host_ms,
                "sim_speed": speed,
                "sim_draft_speed": draft_speed or speed,
                "sim_expand_speed": expand_speed or speed,
                "sim_jitter_corr_ms": corr_ms if jitter is not None else None,
                "real_attainment": rs["attainment"],
                "sim_attainment": att,
                "attainment_gap_pp": 100 * (att - rs["attainment"]),
                "sim_attainment_seeds": per_seed,
                "real_goodput": rs["goodput_tokens_per_s"],
                "sim_goodput": good,
                "goodput_gap": good / rs["goodput_tokens_per_s"] - 1
                if rs["goodput_tokens_per_s"]
                else None,
                "real_accepted_per_step": rs["mean_accepted_per_step"],
                "sim_accepted_per_step": acc,
                "real_wall_s": rs["wall_s"],
                "sim_wall_s": wall,
                "real_tpot_p50_ms": rs["tpot_p50_ms"],
                "sim_tpot_p50_ms": tpot,
            }
            rows.append(row)
            gap = row["goodput_gap"]
            print(
                f"{policy:<15} x{point['time_scale']:<5g} attainment real {rs['attainment']:.1%} "
                f"sim {att:.1%} ({row['attainment_gap_pp']:+.1f} pp); goodput real "
                f"{rs['goodput_tokens_per_s']:.1f} sim {good:.1f} "
                f"({'-' if gap is None else format(gap, '+.1%')}); accepted/step real "
                f"{rs['mean_accepted_per_step']:.2f} sim {acc:.2f}; wall real "
                f"{rs['wall_s']:.1f} s sim {wall:.1f} s; TPOT p50 real "
                f"{rs['tpot_p50_ms'] or 0:.0f} ms sim {tpot:.0f} ms",
                flush=True,
            )
    summary = gap_summary(rows)
    floor = noise_floor_pp(rows, args.seeds)
    for name, g in summary.items():
        print(
            f"{name:<15} mean |attainment gap| {g['mean_abs_gap_pp']:.1f} pp, "
            f"{g['within_5pp']}/{g['points']} points within 5 pp"
            + (f"; seed-scatter floor {floor[name]:.1f} pp" if name in floor else ""),
            flush=True,
        )
    out = {
        "bench_json": args.bench_json,
        "profile": profile.name,
        "host_ms": "measured" if measured_host else profile.host_ms,
        "speed": args.speed if per_cell or traced else speed,
        "speed_scale": scale,
        "trace_of": args.trace_of,
        "jitter": args.jitter,
        "jitter_corr_ms": args.jitter_corr_ms,
        "calibration": cal.path,
        "setup": {  # what sim.pool checks repeats by (the workload by its file name)
            "workload": Path(st["workload"]).name,
            **{
                key: st.get(key)
                for key in (
                    "num_requests",
                    "max_output_len",
                    "max_prompt_len",
                    "max_batch",
                    "token_budget",
                )
            },
        },  # fmt: skip
        "seeds": args.seeds,
        "summary": summary,
        "noise_floor_pp": floor,
        "rows": rows,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
