"""Host overhead of AdaServe token-tree selection per iteration.

    python -m adaserve_jax.bench.selector_overhead [--json OUT] [--repeats 200]

For 16 / 64 / 96 running requests, each with a beam-style candidate tree of ~64 nodes (depth 4,
width 4: every step expands the 4 best frontier nodes into 4 children each), and budgets
128 / 512 / 1024 tokens, it times:

- `select`: `select(SelectionInput)` alone (the two phases),
- `input`: building and validating `SelectionInput` from padded arrays with `max_depth` given
  (the engine knows the tree shape),
- `input_depth`: the same but computing each tree's depth from `parents`,

and reports the median / p90 / min wall time and the median thread CPU time (the machine may be
shared; CPU time excludes time spent descheduled), plus `select + input` as a share of iteration
times of 10 / 30 ms (this CPU engine) and 150 ms (paper scale). Each repetition uses a fresh
request state (decoded tokens, elapsed time, SLO) so both phases do real work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaserve_jax.scheduler.selector import SelectionInput, select

SLOS_S = (0.02 * 1.2, 0.02 * 1.67, 0.02 * 5.0)  # coding / chat / summarization on a 20 ms baseline


def beam_tree(rng: np.random.Generator, depth: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """parents i32[N], log_f f32[N] of a beam-expanded draft tree, N = 1 + depth * width^2."""
    parents, log_f = [-1], [0.0]
    frontier = [0]
    for _ in range(depth):
        new = []
        for node in frontier:
            probs = np.sort(rng.dirichlet(np.full(16, 0.3)))[::-1][:width]
            for p in probs:
                parents.append(node)
                log_f.append(log_f[node] + float(np.log(max(p, 1e-30))))
                new.append(len(parents) - 1)
        frontier = sorted(new, key=lambda j: -log_f[j])[:width]
    return np.array(parents, np.int32), np.array(log_f, np.float32)


def forest(rng: np.random.Generator, rows: int, depth: int, width: int):
    """Padded parents i32[R, N], log_f f32[R, N]."""
    trees = [beam_tree(rng, depth, width) for _ in range(rows)]
    return np.stack([t[0] for t in trees]), np.stack([t[1] for t in trees])


def request_states(rng: np.random.Generator, rows: int, count: int) -> list[dict]:
    """`count` random running-request states (some behind, some ahead of their SLO)."""
    out = []
    for _ in range(count):
        slo = rng.choice(SLOS_S, rows)
        decoded = rng.integers(1, 200, rows)
        elapsed = decoded * slo * rng.uniform(0.7, 1.2, rows)
        out.append(dict(decoded=decoded, elapsed_s=elapsed, tpot_slo_s=slo))
    return out


def _time(fn: Callable[[int], object], repeats: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(i)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    wall.sort()
    return {
        "median_us": statistics.median(wall) * 1e6,
        "p90_us": wall[int(0.9 * (len(wall) - 1))] * 1e6,
        "min_us": wall[0] * 1e6,
        "cpu_median_us": statistics.median(cpu) * 1e6,
    }


def measure(
    rows: int, budget: int, repeats: int, warmup: int, seed: int, iter_ms: list[float]
) -> dict:
    rng = np.random.default_rng(seed)
    parents, log_f = forest(rng, rows, depth=4, width=4)
    num_nodes = np.full(rows, parents.shape[1], np.int32)
    states = request_states(rng, rows, 16)

    def make(i: int, depth: int | None = 4) -> SelectionInput:
        return SelectionInput(
            parents, log_f, num_nodes, **states[i % len(states)], budget=budget,
            t_iter_s=0.02, node_cap=None, max_depth=depth,
        )  # fmt: skip

    inputs = [make(i) for i in range(len(states))]
    sel = select(inputs[0])
    result = {
        "requests": rows,
        "budget": budget,
        "nodes_per_request": int(parents.shape[1]),
        "selected": sel.total,
        "slo_phase_nodes": int(sel.slo_nodes.sum()),
        "throughput_phase_nodes": int(sel.throughput_nodes.sum()),
        "select": _time(lambda i: select(inputs[i % len(inputs)]), repeats, warmup),
        "input": _time(make, repeats, warmup),
        "input_depth": _time(lambda i: make(i, None), repeats, warmup),
    }
    total_us = result["select"]["median_us"] + result["input"]["median_us"]
    result["total_median_us"] = total_us
    result["share_of_iteration"] = {f"{ms:g}ms": total_us / (ms * 1e3) for ms in iter_ms}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64, 96])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iter-ms", type=float, nargs="+", default=[10.0, 30.0, 150.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args(argv)

    results = []
    shares = "  ".join(f"{'@' + format(ms, 'g') + 'ms':>7}" for ms in args.iter_ms)
    print(
        f"{'R':>4} {'B':>5} {'select':>7} {'(min)':>6} {'input':>6} {'+depth':>7} "
        f"{'total':>6}  {shares}   (median wall us; share of iteration = total / iter)"
    )
    for rows in args.requests:
        for budget in args.budgets:
            if budget < rows:
                continue
            r = measure(rows, budget, args.repeats, args.warmup, args.seed, args.iter_ms)
            results.append(r)
            row_shares = "  ".join(f"{v:>7.2%}" for v in r["share_of_iteration"].values())
            print(
                f"{rows:>4} {budget:>5} {r['select']['median_us']:>7.0f} "
                f"{r['select']['min_us']:>6.0f} {r['input']['median_us']:>6.0f} "
                f"{r['input_depth']['median_us']:>7.0f} {r['total_median_us']:>6.0f}  {row_shares}"
            )
    out = {
        "benchmark": "selector_overhead",
        "tree": {"depth": 4, "width": 4},
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
            "numpy": np.__version__,
        },
        "results": results,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
