"""Record the simulator's acceptance calibration (and local profile) from the real pair.

    python -m adaserve_jax.sim.calibrate [--target DIR] [--draft DIR] [--workload TRACE]
        [--prompts N] [--max-tokens L] [--depth D] [--topk K] [--out calibration.json]
        [--streak] [--profile-out profiles/local.json]

Runs the real `Engine` (greedy, policy `tree:D,K`) on trace prompts of every SLO category
and instruments one real scheduler: `engine.expand` is wrapped to keep each step's drafted
trees, and `Scheduler._commit_trees` is wrapped (for this scheduler instance only) to see
the verified segments and the target's tokens before the normal commit. What is recorded
is described in `calibration.py`. With `--profile-out`, the engine's measured latency
profile (engine/profiler.py) is written as the `local` sim profile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adaserve_jax.engine.tree import accept_path
from adaserve_jax.scheduler.policy import fixed_selection, parse_policy
from adaserve_jax.sim.calibration import DEFAULT_CALIBRATION, Calibration, empty_counts
from adaserve_jax.sim.profiles import PROFILE_DIR, profile_from_engine_cache

ROOT = Path(__file__).resolve().parents[2]
MAX_CONF_SAMPLES = 1500


class Recorder:
    """Accumulates calibration counts from instrumented verify steps."""

    def __init__(self, depth: int, topk: int, seed: int = 0, num_bins: int = 20) -> None:
        self.depth, self.topk = depth, topk
        self.bins, self.matched, self.count = empty_counts(topk, num_bins)
        self.by_depth = {d: (np.zeros_like(self.count), np.zeros_like(self.count))
                         for d in range(1, depth + 1)}  # fmt: skip
        self.conf: dict[int, list[np.ndarray]] = {d: [] for d in range(1, depth + 1)}
        self.path_len: list[int] = []
        self.roots: dict = {}  # request (or slot) -> [(root position, top q)] in step order
        self.trees = None
        self.rng = np.random.default_rng(seed)

    def on_trees(self, trees) -> None:
        self.trees = trees

    def on_commit(self, slot: int, seg, target: np.ndarray, shape, key=None) -> None:
        """One verified tree: slot `slot`'s segment, the target's tokens at its nodes; `key`
        names the request (streaks pair consecutive steps of one request; default: slot)."""
        t = self.trees
        sel = fixed_selection(t, slot, shape)
        path, _ = accept_path(seg.parents, seg.tokens, target)
        self.path_len.append(len(path))
        parents, log_f = t.parents[slot], t.log_f[slot]
        tokens, depth = t.tokens[slot], t.depth[slot]
        kids: dict[int, list[int]] = {}
        for c in range(1, parents.shape[0]):
            kids.setdefault(int(parents[c]), []).append(c)
        # draft confidence of every expanded node's children, by child depth
        for v, cs in kids.items():
            q = np.exp(log_f[cs] - log_f[v]).astype(np.float64)
            q = np.sort(np.clip(q, 0.0, 1.0))[::-1]
            self.conf[int(depth[cs[0]])].append(q)
            if v == 0:  # the root's confidence, in the slot's order of steps (streaks)
                self.roots.setdefault(slot if key is None else key, []).append(
                    (int(seg.ctx_len), float(q[0]))
                )
        # calibration on the accepted path: target token at node vs its drafted children
        for i in [0, *path]:
            v = int(sel[i])
            cs = kids.get(v, [])
            if not cs:
                continue
            want = int(target[i])
            q = np.exp(log_f[cs] - log_f[v]).astype(np.float64)
            order = np.argsort(-q, kind="stable")
            dm, dc = self.by_depth[int(depth[cs[0]])]
            for rank, j in enumerate(order[: self.topk]):
                b = min(int(q[j] * (self.bins.size - 1)), self.bins.size - 2)
                hit = int(tokens[cs[j]]) == want
                self.count[rank, b] += 1
                self.matched[rank, b] += hit
                dc[rank, b] += 1
                dm[rank, b] += hit

    def streak(self) -> dict:
        """The streak measured so far (`streak_of` over every request's steps)."""
        return streak_of(list(self.roots.values()))

    def result(self, source: dict, *, streak: bool = False) -> Calibration:
        """The calibration recorded; `streak=True` adds the measured streak (the simulator
        then replays it, calibration.py)."""
        conf = {}
        for d, rows in self.conf.items():
            if not rows:
                continue
            arr = np.array(rows, np.float32)
            if arr.shape[0] > MAX_CONF_SAMPLES:
                arr = arr[self.rng.choice(arr.shape[0], MAX_CONF_SAMPLES, replace=False)]
            conf[d] = arr
        lens = np.array(self.path_len)
        per_depth = {
            d: (int((lens >= d - 1).sum()), int((lens >= d).sum()))
            for d in range(1, self.depth + 1)
        }
        src = dict(source, verify_steps=int(lens.size), accepted_hist=np.bincount(
            lens, minlength=self.depth + 1
        ).tolist())  # fmt: skip
        return Calibration(
            self.bins, self.matched, self.count, conf, per_depth, src, by_depth=self.by_depth,
            streak=self.streak() if streak else {},
        )  # fmt: skip


def streak_of(runs: list[list[tuple[int, float]]]) -> dict:
    """The streak fields (calibration.py) from every request's steps in order, as (root
    position, root top q); a position that does not grow is not paired with the one before.
    Ranks every q among all of them; `step_corr` is the rank correlation of consecutive steps
    of one request, and `rho_per_token` the rho whose mean rho**gap over those pairs' gaps
    (tokens) equals it (bisection; 0 when the correlation is not positive). Empty with fewer
    than 8 pairs."""
    qs = np.array([q for run in runs for _, q in run])
    if qs.size == 0:
        return {}
    order = np.argsort(qs, kind="stable")
    rank = np.empty(qs.size)
    rank[order] = (np.arange(qs.size) + 0.5) / qs.size
    pos = np.array([p for run in runs for p, _ in run], np.float64)
    request = np.repeat(np.arange(len(runs)), [len(run) for run in runs])
    gap = np.diff(pos)
    pair = (request[1:] == request[:-1]) & (gap > 0)  # consecutive steps of one request
    if pair.sum() < 8:
        return {}
    corr = float(np.corrcoef(rank[:-1][pair], rank[1:][pair])[0, 1])
    g = gap[pair]
    rho = 0.0
    if corr > 0:
        lo, hi = 0.0, 1.0
        for _ in range(60):  # mean(rho**g) grows with rho from 0 to 1
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.mean(mid**g) < corr else (lo, mid)
        rho = 0.5 * (lo + hi)
    return {
        "step_corr": round(corr, 4),
        "mean_gap_tokens": round(float(g.mean()), 3),
        "pairs": int(pair.sum()),
        "rho_per_token": round(min(rho, 0.999), 4),
    }


def record_simulated(
    cal: Calibration,
    *,
    depth: int = 4,
    topk: int = 2,
    requests: int = 32,
    max_tokens: int = 200,
    seed: int = 0,
    num_bins: int | None = None,
) -> Calibration:
    """Run the recorder on the *simulated* engine (same instrumentation as the real run).

    Comparing its per-depth acceptance and match rates with `cal` checks the simulator
    end to end through the real scheduler's acceptance walk."""
    from adaserve_jax.scheduler.loop import Scheduler
    from adaserve_jax.scheduler.request import Request
    from adaserve_jax.sim.engine import SimEngine, VirtualClock
    from adaserve_jax.sim.profiles import load_profile

    policy = f"tree:{depth},{topk}"
    shape = parse_policy(policy).shape
    clock = VirtualClock()
    eng = SimEngine(
        load_profile("paper-llama70b"), cal, num_slots=requests, max_len=max_tokens + 16,
        clock=clock, seed=seed,
    )  # fmt: skip
    rec = Recorder(depth, topk, seed, num_bins or cal.bins.size - 1)
    inner_expand = eng.expand

    def expand(*args):
        trees = inner_expand(*args)
        rec.on_trees(trees)
        return trees

    eng.expand = expand
    sched = Scheduler(eng, policy=policy, token_budget=max(1024, requests * 16), clock=clock)
    _record_commits(sched, rec, shape)
    for i in range(requests):
        sched.submit(Request(f"r{i}", (1,) * 8, max_tokens))
    sched.run_until_done()
    return rec.result({"simulated": True, "policy": policy}, streak=True)


def _record_commits(sched, rec: Recorder, shape) -> None:
    """Show `rec` every verified segment and the target's tokens, then commit as usual."""
    inner_commit = sched._commit_trees

    def commit(decode, segs, sampled, offsets, now):
        for r, seg, off in zip(decode, segs, offsets, strict=False):
            rec.on_commit(r.slot, seg, sampled[off : off + len(seg)], shape, r.request.request_id)
        return inner_commit(decode, segs, sampled, offsets, now)

    sched._commit_trees = commit


def _prompts(workload: str, n: int) -> list[tuple[str, str]]:
    from adaserve_jax.bench.workload import load_workload

    entries = load_workload(workload)
    by_cat: dict[str, list] = {}
    for e in entries:
        by_cat.setdefault(e.category, []).append(e)
    out = []
    i = 0
    while len(out) < n:
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]) and len(out) < n:
                out.append((cat, by_cat[cat][i].prompt))
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaserve_jax.sim.calibrate")
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument(
        "--workload", default="/work/shared/workloads/adaserve-artifact/rps2.4_ol256.json"
    )
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-len", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    ap.add_argument(
        "--streak", action="store_true",
        help="store the measured streak in the file (the simulator then replays it); the "
        "measurement is printed either way",
    )  # fmt: skip
    ap.add_argument("--profile-out", default=None, help=f"e.g. {PROFILE_DIR / 'local.json'}")
    args = ap.parse_args(argv)

    from adaserve_jax import Engine, load_model
    from adaserve_jax.scheduler.loop import Scheduler

    policy = f"tree:{args.depth},{args.topk}"
    shape = parse_policy(policy).shape
    target, draft = load_model(args.target), load_model(args.draft)
    t0 = time.perf_counter()
    engine = Engine(
        target, draft, max_batch=args.max_batch, policy=policy, progress=False,
        profile=args.profile_out is not None,
    )  # fmt: skip
    rec = Recorder(args.depth, args.topk)
    inner_expand = engine.expand

    def expand(root_vals, root_toks, root_pos, tree_shape):
        trees = inner_expand(root_vals, root_toks, root_pos, tree_shape)
        rec.on_trees(trees)
        return trees

    engine.expand = expand
    prompts = _prompts(args.workload, args.prompts)
    sched: Scheduler = engine._scheduler(policy)
    _record_commits(sched, rec, shape)
    for i, (cat, text) in enumerate(prompts):
        ids = engine.encode_prompt(text)[: args.max_prompt_len]
        sched.submit(
            engine.make_request(ids, max_tokens=args.max_tokens, request_id=f"cal-{i}",
                                temperature=0.0, seed=0, category=cat)
        )  # fmt: skip
    sched.run_until_done()
    source = {
        "target": args.target,
        "draft": args.draft,
        "policy": policy,
        "workload": args.workload,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "greedy": True,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    cal = rec.result(source, streak=args.streak)
    print(f"wrote {cal.save(args.out)}")
    sim = record_simulated(cal, depth=args.depth, topk=args.topk)
    for name, c in (("real", cal), ("simulated", sim)):
        rates = {d: round(r, 3) for d, r in c.per_depth_rate().items()}
        hist = np.array(c.source["accepted_hist"])
        mean = 1 + (hist * np.arange(hist.size)).sum() / hist.sum()
        print(
            f"{name}: per-depth acceptance {rates}; accepted/step (bonus incl.) {mean:.2f}; "
            f"streak {(rec.streak() if c is cal else c.streak) or '-'}"
        )
    if args.profile_out:
        data = profile_from_engine_cache(
            engine.profile_path,
            name="local",
            description=(
                f"Measured on this machine by adaserve_jax.engine.profiler for {args.target} + "
                f"{args.draft} (max_batch {args.max_batch}); steps padded to compiled buckets."
            ),
        )
        out = Path(args.profile_out)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
