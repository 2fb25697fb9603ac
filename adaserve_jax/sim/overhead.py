"""Host overhead of the shared `Scheduler` (scheduler/loop.py) at paper scale, as a share of
the simulated iteration.

    python -m adaserve_jax.sim.overhead [--profile paper-llama70b] [--running 64 80 96]
        [--budgets 256 512 1024] [--policy adaserve ...] [--iterations 150]
        [--json OUT.json] [--hotspots]

For every (policy, running requests, token budget): `n` requests with long outputs are
submitted at t = 0 and prefilled; then `iterations` steady-state decode iterations are timed.
Host time = the scheduler's CPU time per `step()` minus the simulated engine's own CPU time
(the device's work in a real deployment), i.e. admission, budget rule, selection, segment
building, the acceptance walk and bookkeeping. The share divides it by the iteration's
simulated (virtual) latency, the paper's "0.41%" metric. `selection` is
`Scheduler._adaserve_select` alone: sibling ranks, calibration, budget rule and selector (CPU
time; `selection_wall_ms` is the scheduler's own wall-clock
`select_seconds`, inflated when other processes share the cores). `--hotspots` prints a cProfile
of the largest configuration.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import numpy as np

from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.request import Request
from adaserve_jax.sim.calibration import load_calibration
from adaserve_jax.sim.engine import SimEngine, VirtualClock
from adaserve_jax.sim.profiles import load_profile


def measure(profile, calibration, policy: str, running: int, budget: int, iterations: int,
            prompt_len: int = 256, profiler=None) -> dict:  # fmt: skip
    clock = VirtualClock()
    eng = SimEngine(profile, calibration, num_slots=running, max_len=8192, clock=clock)
    sched = Scheduler(
        eng, policy=policy, token_budget=budget, clock=clock, profile=profile.latency_profile()
    )
    for i in range(running):
        sched.submit(Request(f"r{i}", (1,) * prompt_len, 4000, tpot_slo_ms=(36, 50, 150)[i % 3]))
    # prefill everyone first (adaserve would otherwise keep its trees ahead of the prompts, and
    # the first requests would finish before the last ones start decoding)
    floor, sched.prefill_floor = sched.prefill_floor, budget
    while any(r.phase.value != "decode" for r in sched.running) or sched.waiting:
        sched.step()
    sched.prefill_floor = floor
    for _ in range(10):  # warm-up: acceptance refits, caches
        sched.step()
    if len(sched.running) != running:
        raise RuntimeError(f"{len(sched.running)} of {running} requests still running")
    sel_cpu = [0.0]
    inner_select = sched._adaserve_select

    def timed_select(*args):  # CPU time of calibration + budget rule + selector
        c = time.thread_time()
        out = inner_select(*args)
        sel_cpu[0] += time.thread_time() - c
        return out

    sched._adaserve_select = timed_select
    host, virtual, select = [], [], []
    if profiler is not None:
        profiler.enable()
    sel_cpu[0] = 0.0
    for _ in range(iterations):
        c0, e0, v0 = time.thread_time(), eng.cpu_seconds, clock()
        sched.step()
        host.append(time.thread_time() - c0 - (eng.cpu_seconds - e0))
        virtual.append(clock() - v0)
        select.append(sched.step_log[-1].select_seconds)
    if profiler is not None:
        profiler.disable()
    host_a, virt_a = np.array(host), np.array(virtual)
    tokens = np.mean([r.tokens for r in sched.step_log[-iterations:]])
    return {
        "policy": policy,
        "running": running,
        "token_budget": budget,
        "mean_tokens_per_step": float(tokens),
        "iteration_ms": float(virt_a.mean() * 1e3),
        "host_ms": float(host_a.mean() * 1e3),
        "host_p90_ms": float(np.percentile(host_a, 90) * 1e3),
        "selection_ms": float(sel_cpu[0] / iterations * 1e3),
        "selection_wall_ms": float(np.mean(select) * 1e3),
        "host_share": float(host_a.sum() / virt_a.sum()),
        "selection_share": float(sel_cpu[0] / virt_a.sum()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.overhead")
    ap.add_argument("--profile", default="paper-llama70b")
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--running", type=int, nargs="+", default=[64, 80, 96])
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--policy", action="append", dest="policies")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--hotspots", action="store_true")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    profile = load_profile(args.profile)
    cal = load_calibration(args.calibration)
    rows = []
    for policy in args.policies or ["adaserve"]:
        for n in args.running:
            for b in args.budgets:
                if b < n:
                    continue
                r = measure(profile, cal, policy, n, b, args.iterations)
                rows.append(r)
                print(
                    f"{policy:<15} n={n:<3} B={b:<5} "
                    f"tokens/step {r['mean_tokens_per_step']:6.1f}  iteration "
                    f"{r['iteration_ms']:6.1f} ms  host {r['host_ms']:6.3f} ms "
                    f"({r['host_share']:.3%})  selection {r['selection_ms']:.3f} ms "
                    f"({r['selection_share']:.3%})",
                    flush=True,
                )
    if args.hotspots:
        prof = cProfile.Profile(time.thread_time)  # CPU time: contention-proof attribution
        policy = (args.policies or ["adaserve"])[0]
        measure(profile, cal, policy, max(args.running), max(args.budgets), args.iterations,
                profiler=prof)  # fmt: skip
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
