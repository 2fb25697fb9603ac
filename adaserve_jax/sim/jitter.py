"""The machine's scatter of device calls around their second's speed, for the simulator.

    python -m adaserve_jax.sim.jitter BENCH.json [BENCH.json ...] [--json OUT.json]

A real bench replay records, per policy and load, `speed_trace` (each second's calls' wall
time over their profile price) and `speed_scatter` (quantiles of every call's own ratio over
its second's: how far single steps stray from their second's speed). This pools the
`speed_scatter` of every cell of the given benches into one sample per kind of call
(`{kind: [ratio, ...]}`, every cell weighted alike), the JSON `validate --jitter FILE` and
`sim/engine.py SpeedJitter` read. `adaserve_jax/sim/jitter_local.json` (`--jitter local`) is
this machine's, pooled from the bench run named in SIMULATION.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from adaserve_jax.bench.replay import SPEED_KINDS

LOCAL_JITTER = Path(__file__).resolve().parent / "jitter_local.json"


def pool_scatter(benches: list[dict]) -> dict[str, list[float]]:
    """Every cell's `speed_scatter` quantiles pooled per kind (kinds never timed left out)."""
    pooled: dict[str, list[float]] = {}
    for bench in benches:
        for point in bench.get("sweep", []):
            for cell in point["policies"].values():
                for kind, q in (cell.get("speed_scatter") or {}).items():
                    if q:
                        pooled.setdefault(kind, []).extend(float(x) for x in q)
    return {k: sorted(round(x, 4) for x in v) for k, v in pooled.items() if k in SPEED_KINDS}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.jitter")
    ap.add_argument("bench_json", nargs="+")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    benches = []
    for path in args.bench_json:
        try:
            benches.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {path}: {exc}") from None
    out = pool_scatter(benches)
    if "verify" not in out:
        raise SystemExit(
            f"error: {', '.join(args.bench_json)}: no cell records speed_scatter for verify "
            "calls (benches since commit 987d0c7 do)"
        )
    for kind, x in out.items():
        q = np.quantile(x, [0.01, 0.1, 0.5, 0.9, 0.99])
        print(f"{kind:<7} {len(x)} points; quantiles 1/10/50/90/99%: {np.round(q, 3).tolist()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
