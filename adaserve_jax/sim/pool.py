"""Pool the validations of repeated real runs: the simulator's mean against the real mean.

    python -m adaserve_jax.sim.pool V1.json V2.json ... [--json OUT.json]

Each input is the JSON of `python -m adaserve_jax.sim.validate` for one real bench run; the
runs must be repeats of one bench command (same workload, request count, output and prompt
caps, batch and budget: validate's `setup`) validated with the same options (profile, host
time, speeds, jitter, calibration, seeds). A real run is one draw of which requests' drafts
happen to go well; the simulator replays it at that run's own measured speeds and averages
its seeds. Over several repeats, the real runs' sampling scatter averages out as well, so
the gap between the two means (per policy and load) measures the simulator's model rather
than one run's luck. Prints, per policy and load, each run's real and simulated attainment
and the pooled gap; writes rows like validate's (`attainment_gap_pp` is the pooled gap) plus
the per-run summary for comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaserve_jax.sim.validate import gap_summary

# validation options that must match for the runs to be pooled
OPTIONS = (
    "profile", "host_ms", "speed", "speed_scale", "trace_of", "jitter", "calibration", "seeds",
)  # fmt: skip
# ... and those newer than some saved validations (absent: None, their default)
LATER_OPTIONS = ("jitter_corr_ms",)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def pool(validations: list[tuple[str, dict]]) -> dict:
    """Pooled rows and summaries from (file name, validate JSON) pairs; ValueError naming
    the file and the field when they are not repeats validated alike."""
    if len(validations) < 2:
        raise ValueError("pooling needs at least two validation JSONs")
    first_name, first = validations[0]
    for name, v in validations:
        for field in ("setup", "rows", *OPTIONS):
            if field not in v:
                raise ValueError(f"{name}: no field {field!r} (re-run sim.validate)")
    cells: dict[tuple[str, float], list[dict]] = {}
    order: list[tuple[str, float]] = []
    for name, v in validations:
        for field in ("setup", *OPTIONS, *LATER_OPTIONS):
            if v.get(field) != first.get(field):
                raise ValueError(
                    f"{name}: field {field!r} is {v.get(field)!r}, {first_name} has "
                    f"{first.get(field)!r}: not repeats validated alike"
                )
        keys = [(r["policy"], float(r["time_scale"])) for r in v["rows"]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: field 'rows' repeats a (policy, time_scale)")
        if not order:
            order = keys
        elif set(keys) != set(order):
            raise ValueError(
                f"{name}: field 'rows' has points {sorted(set(keys) ^ set(order))} that "
                f"{first_name} has not (or lacks them)"
            )
        for key, r in zip(keys, v["rows"], strict=True):
            cells.setdefault(key, []).append(r)
    rows = []
    for policy, scale in order:
        rs = cells[(policy, scale)]
        real = [r["real_attainment"] for r in rs]
        sim = [r["sim_attainment"] for r in rs]
        real_good = _mean([r["real_goodput"] for r in rs])
        sim_good = _mean([r["sim_goodput"] for r in rs])
        rows.append(
            {
                "policy": policy,
                "time_scale": scale,
                "real_attainment_runs": real,
                "sim_attainment_runs": sim,
                "real_attainment": _mean(real),
                "sim_attainment": _mean(sim),
                "attainment_gap_pp": 100 * (_mean(sim) - _mean(real)),
                "run_gaps_pp": [r["attainment_gap_pp"] for r in rs],
                "real_spread_pp": 100 * (max(real) - min(real)),
                "real_goodput": real_good,
                "sim_goodput": sim_good,
                "goodput_gap": sim_good / real_good - 1 if real_good else None,
                "real_accepted_per_step": _mean([r["real_accepted_per_step"] for r in rs]),
                "sim_accepted_per_step": _mean([r["sim_accepted_per_step"] for r in rs]),
            }
        )
    per_run = [r for _, v in validations for r in v["rows"]]
    return {
        "validations": [name for name, _ in validations],
        "setup": first["setup"],
        "options": {field: first.get(field) for field in (*OPTIONS, *LATER_OPTIONS)},
        "summary": gap_summary(rows),
        "per_run_summary": gap_summary(per_run),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.pool")
    ap.add_argument("validations", nargs="+", help="sim.validate JSONs of repeated runs")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    loaded = []
    for name in args.validations:
        try:
            loaded.append((name, json.loads(Path(name).read_text())))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {name}: {exc}") from None
    try:
        out = pool(loaded)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for r in out["rows"]:
        runs = " ".join(
            f"{a:.0%}/{b:.0%}"
            for a, b in zip(r["real_attainment_runs"], r["sim_attainment_runs"], strict=True)
        )
        print(
            f"{r['policy']:<15} x{r['time_scale']:<5g} real/sim per run {runs}; mean real "
            f"{r['real_attainment']:.1%} sim {r['sim_attainment']:.1%} "
            f"({r['attainment_gap_pp']:+.1f} pp; real spread {r['real_spread_pp']:.1f} pp)",
            flush=True,
        )
    for name, g in out["summary"].items():
        one = out["per_run_summary"][name]
        print(
            f"{name:<15} pooled mean |gap| {g['mean_abs_gap_pp']:.1f} pp, {g['within_5pp']}/"
            f"{g['points']} points within 5 pp (per run: {one['mean_abs_gap_pp']:.1f} pp, "
            f"{one['within_5pp']}/{one['points']})",
            flush=True,
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
