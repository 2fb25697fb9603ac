"""What each policy's scheduling path costs per token when a request has the engine to itself.

    python -m adaserve_jax.bench.lone_request [--policy autoregressive --policy adaserve]
        [--requests 24] [--max-tokens 64] [--json OUT]

At light load a request decodes alone, so its TPOT is one plain step plus whatever the policy
adds around it: host work (pacing, bookkeeping), and for AdaServe the draft model kept in step
with the target (catch-up draft steps while drafting is off) and its occasional speculative
explorations. With TPOT SLOs 1.2x the baseline step, a few percent of such overhead decides
attainment. One scheduler per policy on one warmed engine; held-out coding prompts are served
one at a time, the policies taking turns on each prompt (so the machine's drift hits all of
them alike). Reported per policy: TPOT mean and median, and per decoded token (after the
first: prefill excluded) the target steps and draft calls (`draft_step` and `expand`) and the
wall time they took.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from adaserve_jax.bench.speculation import DEFAULT_WORKLOAD, ROOT, coding_prompts


def _timed(engine, name: str, store: dict) -> None:
    """Wrap `engine.name` (an instance attribute): count its calls and their wall time into
    `store[policy][name_*]` for the policy `store["policy"]` being served, while its request
    decodes (`store["decoding"]`: after its first token, i.e. no prefill)."""
    original = getattr(engine, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        if not store["decoding"]:
            return out
        row = store[store["policy"]]
        row[name + "_calls"] += 1
        row[name + "_ms"] += 1e3 * (time.perf_counter() - t0)
        return out

    setattr(engine, name, wrapper)


def main(argv: list[str] | None = None) -> dict:
    from adaserve_jax import Engine, load_model
    from adaserve_jax.scheduler.request import Request

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tpot-slo-ms", type=float, default=None,
                    help="the requests' TPOT SLO (default: the coding category's)")  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 2:
        ap.error("--requests must be >= 1 and --max-tokens >= 2")
    policies = args.policy or ["autoregressive", "adaserve"]
    target, draft = load_model(args.target), load_model(args.draft)
    engine = Engine(
        target,
        draft,
        max_batch=8,
        token_budget=64,
        policy=policies[0],
        policies=policies[1:],
        token_buckets=(1, 2, 4, 8, 16, 32, 64),
        ctx_buckets=(256,),
    )
    if engine.latency_profile is None:
        engine.run_profile()
    slo = args.tpot_slo_ms or engine.category_slo_ms("coding")
    tok = target.tokenizer
    texts = coding_prompts(Path(DEFAULT_WORKLOAD), args.requests)
    prompts = [tuple(tok.encode(p)[-160:]) for p in texts]
    store: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    for name in ("forward", "draft_step", "expand"):
        _timed(engine, name, store)

    def first_token(state, tokens) -> None:
        store["decoding"] = True

    schedulers = {p: engine._scheduler(p, on_tokens=first_token) for p in policies}
    tpot: dict[str, list[float]] = {p: [] for p in policies}
    decoded = dict.fromkeys(policies, 0)  # tokens after each request's first
    for rep in range(2):  # round 0 warms every policy's host path; round 1 is measured
        for i, prompt in enumerate(prompts if rep else prompts[:2]):
            for policy, sched in schedulers.items():
                store["policy"] = policy if rep else "warm-up"
                store["decoding"] = False
                state = sched.submit(
                    Request(f"{rep}-{i}", prompt, args.max_tokens, tpot_slo_ms=slo)
                )
                sched.run_until_done()
                if rep and len(state.output) > 1:
                    span = state.last_token_time - state.first_token_time
                    tpot[policy].append(1e3 * span / (len(state.output) - 1))
                    decoded[policy] += len(state.output) - 1
    result = {"tpot_slo_ms": slo, "requests": len(prompts), "max_tokens": args.max_tokens,
              "policies": {}}  # fmt: skip
    for policy in policies:
        row = store[policy]
        tokens = max(decoded[policy], 1)
        out = {
            "tpot_ms_mean": float(np.mean(tpot[policy])),
            "tpot_ms_median": float(np.median(tpot[policy])),
            "attainment": float(np.mean(np.array(tpot[policy]) <= slo)),
            "target_steps_per_token": row["forward_calls"] / tokens,
            "target_ms_per_token": row["forward_ms"] / tokens,
            "draft_calls_per_token": (row["draft_step_calls"] + row["expand_calls"]) / tokens,
            "draft_ms_per_token": (row["draft_step_ms"] + row["expand_ms"]) / tokens,
        }
        result["policies"][policy] = out
        print(
            f"{policy:15s} TPOT mean {out['tpot_ms_mean']:.3f} ms (median "
            f"{out['tpot_ms_median']:.3f}; {out['attainment']:.0%} within {slo:.2f} ms); per "
            f"token: target {out['target_ms_per_token']:.3f} ms in "
            f"{out['target_steps_per_token']:.3f} steps, draft {out['draft_ms_per_token']:.3f} "
            f"ms in {out['draft_calls_per_token']:.3f} calls"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
