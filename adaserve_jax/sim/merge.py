"""Merge simulation JSONs (e.g. one per trace, run in parallel) into one load sweep + plot.

python -m adaserve_jax.sim.merge A.json B.json ... --json OUT.json [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(results: list[dict]) -> dict:
    """One result whose `sweep` holds every input's points, sorted by offered load."""
    if not results:
        raise ValueError("nothing to merge")
    base = results[0]
    for r in results[1:]:
        if r["baseline_tpot_ms"] != base["baseline_tpot_ms"]:
            raise ValueError("cannot merge runs with different baseline TPOTs (profiles)")
    points = sorted((p for r in results for p in r["sweep"]), key=lambda p: p["offered_rps"] or 0.0)
    settings = dict(base["settings"])
    workloads = [w for r in results for w in r["settings"]["workloads"]]
    settings["workloads"] = workloads
    settings["workload"] = ", ".join(Path(w).name for w in workloads)
    settings["num_requests"] = max(r["settings"]["num_requests"] for r in results)
    settings["sim_seconds"] = sum(r["settings"]["sim_seconds"] for r in results)
    return {
        "baseline_tpot_ms": base["baseline_tpot_ms"],
        "simulated": True,
        "settings": settings,
        "sweep": points,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.merge")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--json", dest="json_out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    out = merge([json.loads(Path(p).read_text()) for p in args.inputs])
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    if args.plot:
        from adaserve_jax.sim.plots import plot_load_sweep

        print(f"wrote {plot_load_sweep(out, args.plot, args.title)}")
    return out


if __name__ == "__main__":
    main()
