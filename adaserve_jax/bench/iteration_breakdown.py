"""Where a decoding iteration's time goes, per device call, for a few policies side by side.

    python -m adaserve_jax.bench.iteration_breakdown [--policy autoregressive --policy spec:3]
        [--batch 8] [--max-tokens 96] [--json OUT]

Greedy generation of `--batch` held-out Python prompts (as `bench.speculation`) once per
policy on one warmed engine, with every device call timed to completion (`block_until_ready`
after each call, which serializes host and device a little more than serving does): the
target's flat steps by head and token bucket, the draft's steps and its tree expansion calls;
"host" is the rest of the wall time (prefill included: every policy prefills the same prompts).
With `bench.speculation`'s tokens per verify step this bounds speculation: `tokens per step x
(autoregressive ms per step) / (verify ms per step)` is the most a policy could gain with a free
draft and no host time (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax

from adaserve_jax.bench.speculation import DEFAULT_WORKLOAD, ROOT, coding_prompts


def _call_label(device, args) -> str:
    """'6L sample T=32': the model's layers, the step's head and token bucket."""
    return f"{device.config.num_layers}L {args[1]} T={args[0].bucket}"


def _timed(store: dict, cls, name: str, label) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(self, *args, **kwargs)
        jax.block_until_ready(out)
        device = getattr(self, "device", self)
        jax.block_until_ready(device._caches)
        key = label(self, args)
        store["s"][key] += time.perf_counter() - t0
        store["n"][key] += 1
        return out

    setattr(cls, name, wrapper)


def main(argv: list[str] | None = None) -> dict:
    from adaserve_jax import Engine, load_model
    from adaserve_jax.engine.device import DeviceModel
    from adaserve_jax.engine.speculation import DraftDevice

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    policies = args.policy or ["autoregressive", "spec:1", "spec:3"]
    store = {"s": collections.defaultdict(float), "n": collections.Counter()}
    _timed(store, DeviceModel, "_call", _call_label)
    _timed(store, DraftDevice, "_call_expand", lambda d, a: f"expand rows={len(a[2])}")
    target, draft = load_model(args.target), load_model(args.draft)
    engine = Engine(
        target, draft, max_batch=args.batch, policies=policies, max_len=512, ctx_buckets=(256, 512)
    )
    tok = target.tokenizer
    prompts = [tok.encode(p)[-160:] for p in coding_prompts(Path(DEFAULT_WORKLOAD), args.batch)]
    result = {"batch": args.batch, "max_tokens": args.max_tokens, "policies": {}}
    for policy in policies:
        engine.generate(prompts, max_tokens=4, policy=policy)  # warm the host path
        store["s"].clear(), store["n"].clear()
        t0 = time.perf_counter()
        engine.generate(prompts, max_tokens=args.max_tokens, policy=policy)
        wall = time.perf_counter() - t0
        calls = {k: {"calls": store["n"][k], "ms": 1e3 * v} for k, v in sorted(store["s"].items())}
        row = {
            "wall_ms": 1e3 * wall,
            "host_ms": 1e3 * (wall - sum(store["s"].values())),
            "calls": calls,
        }
        result["policies"][policy] = row
        print(f"== {policy}: wall {row['wall_ms']:.0f} ms, host {row['host_ms']:.0f} ms")
        for k, c in calls.items():
            per = c["ms"] / c["calls"]
            print(f"   {k:28s} {c['calls']:4d} calls {c['ms']:8.1f} ms  {per:6.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
