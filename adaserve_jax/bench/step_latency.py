"""Step latency of the flat-token step vs the memory floor, and decode speed vs transformers.

    python -m adaserve_jax.bench.step_latency [--model checkpoints/target] [--json OUT]

For T = 1, 16, 64, 256 tokens (one request's chain on top of `--context` committed
rows) it times the jitted step and prints it next to the memory floor measured in
the same run: (parameter bytes + KV bytes attended) / measured memory bandwidth.
Then it times greedy single-request decoding with `Engine.generate` and with
`transformers` `generate` on the same weights (when torch is installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from adaserve_jax.engine.batch import Segment
from adaserve_jax.engine.device import DeviceModel


def measure_bandwidth_gbs(num_bytes: int = 256 << 20, repeats: int = 7) -> float:
    """Read bandwidth (GB/s) of a large float32 reduction, best of `repeats`."""
    a = np.ones(num_bytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best / 1e9


def time_step(dev: DeviceModel, t: int, context: int, repeats: int) -> float:
    """Median seconds of one step with a t-token chain on top of `context` committed rows."""
    seg = Segment.chain(0, context, [1] * t)
    dev.run([seg])  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dev.run([seg])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    from adaserve_jax import Engine, load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=str(Path(__file__).resolve().parents[2] / "checkpoints" / "target")
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = load_model(args.model)
    cfg = model.config
    dev = DeviceModel(
        model,
        num_slots=1,
        max_len=cfg.max_seq_len,
        token_buckets=sorted(args.tokens),
        ctx_buckets=(args.context,),
    )
    dev.warmup()
    bw = measure_bandwidth_gbs()
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves(model.params))
    kv_bytes = 2 * 4 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * args.context
    floor_ms = (param_bytes + kv_bytes) / (bw * 1e9) * 1e3
    rows = []
    print(
        f"model {args.model}: {param_bytes / 1e6:.1f} MB params, bandwidth {bw:.1f} GB/s, "
        f"memory floor {floor_ms:.2f} ms (params + {args.context}-row KV)"
    )
    print(f"{'T':>5} {'step ms':>9} {'x floor':>8} {'ms/token':>9}")
    for t in args.tokens:
        ms = time_step(dev, t, args.context, args.repeats) * 1e3
        rows.append({"tokens": t, "step_ms": ms, "ratio_to_floor": ms / floor_ms})
        print(f"{t:>5} {ms:>9.2f} {ms / floor_ms:>8.2f} {ms / t:>9.3f}")

    # Greedy single-request decoding: ours vs transformers on the same weights.
    engine = Engine(model, max_batch=1, progress=False)
    prompt = list(range(1, 17))
    engine.generate([prompt], max_tokens=8)
    t0 = time.perf_counter()
    (out,) = engine.generate([prompt], max_tokens=args.decode_tokens)
    ours = len(out.token_ids) / (time.perf_counter() - t0)
    result = {
        "model": args.model,
        "bandwidth_gbs": bw,
        "memory_floor_ms": floor_ms,
        "context": args.context,
        "steps": rows,
        "decode_tokens_per_s": ours,
    }
    print(f"greedy decode, 1 request: adaserve_jax {ours:.1f} tokens/s")
    try:
        import torch

        from adaserve_jax.bench.hf_reference import to_hf_llama
    except ImportError:
        print("torch/transformers not installed: skipping the transformers comparison")
    else:
        hf = to_hf_llama(model.params, cfg)
        ids = torch.tensor([prompt])
        kw = dict(
            do_sample=False,
            max_new_tokens=args.decode_tokens,
            min_new_tokens=args.decode_tokens,
            pad_token_id=0,
        )
        with torch.no_grad():
            hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
            t0 = time.perf_counter()
            hf_out = hf.generate(ids, **kw)
            theirs = args.decode_tokens / (time.perf_counter() - t0)
        same = hf_out[0, len(prompt) :].tolist() == out.token_ids
        result.update(transformers_tokens_per_s=theirs, speedup=ours / theirs, same_tokens=same)
        print(
            f"greedy decode, 1 request: transformers {theirs:.1f} tokens/s "
            f"-> {ours / theirs:.2f}x; identical tokens: {same}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
