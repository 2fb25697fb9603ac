"""How far apart the same sweep lands when it is run again: the real engine's reproducibility.

    python -m adaserve_jax.bench.spread RUN.json RUN.json [RUN.json ...] [--json OUT]

Reads two or more sweep results of `python -m adaserve_jax.bench` made with the same command
(same workload, requests, output cap, policies, loads, token budget and baseline mode; the
runs are refused otherwise, naming the setting that differs) and prints, per load and policy,
each run's attainment and their range (max - min, percentage points), then per policy the
mean range over the loads. On a shared 2-core machine the speed drifts by tens of percent from
minute to minute, and the SLOs sit 1.2x above a lone step, so the same command can land far
apart; a simulator judged against one real run cannot be expected to agree closer than the
real engine agrees with itself (SIMULATION.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAME = ("workload", "num_requests", "max_output_len", "policies", "time_scales", "token_budget")


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {path}: {exc}") from None
    if not isinstance(data, dict) or "settings" not in data or "sweep" not in data:
        raise SystemExit(f"error: {path}: not a sweep result (needs 'settings' and 'sweep')")
    return data


def spread(runs: dict[str, dict]) -> dict:
    """{"points": [{time_scale, policy, attainment: [per run], range_pp}], "mean_range_pp":
    {policy: pp}} for sweeps `runs` ({name: bench JSON}) made with the same settings."""
    names = list(runs)
    first = runs[names[0]]["settings"]
    for name in names[1:]:
        st = runs[name]["settings"]
        for key in (*SAME, "baseline"):
            if st.get(key) != first.get(key):
                raise SystemExit(
                    f"error: {name}: setting {key!r} is {st.get(key)!r}, "
                    f"{names[0]} has {first.get(key)!r}: not the same command"
                )
    points, ranges = [], {}
    for point in runs[names[0]]["sweep"]:
        ts = point["time_scale"]
        for policy in point["policies"]:
            att = []
            for name in names:
                match = [p for p in runs[name]["sweep"] if p["time_scale"] == ts]
                cell = match[0]["policies"].get(policy) if match else None
                value = cell.get("attainment") if isinstance(cell, dict) else None
                if not isinstance(value, int | float):
                    raise SystemExit(f"error: {name}: no attainment for {policy} at x{ts}")
                att.append(100 * value)
            rng = max(att) - min(att)
            points.append({"time_scale": ts, "policy": policy, "attainment": att, "range_pp": rng})
            ranges.setdefault(policy, []).append(rng)
    return {
        "runs": names,
        "points": points,
        "mean_range_pp": {p: sum(r) / len(r) for p, r in ranges.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.bench.spread")
    ap.add_argument("runs", nargs="+", help="sweep JSONs made with the same command")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("needs at least two runs")
    out = spread({path: _load(path) for path in args.runs})
    for p in out["points"]:
        cells = " ".join(f"{a:5.1f}" for a in p["attainment"])
        print(f"x{p['time_scale']:<5g} {p['policy']:<15} {cells}   range {p['range_pp']:5.1f} pp")
    for policy, r in out["mean_range_pp"].items():
        print(f"{policy:<15} mean range over the loads {r:.1f} pp")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
