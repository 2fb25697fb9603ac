"""Speculation speed on the shipped pair: autoregressive vs spec:N vs tree:D,W at batch 1 and 8.

    python -m adaserve_jax.bench.speculation --json bench_results/speculation.json \
        --plot bench_results/speculation.png

All policies run one after another on the same warmed engine and the same held-out
Python prompts (HumanEval function headers from the shared coding trace; the
training corpus is the standard library, so these are unseen). Greedy decoding,
so every policy produces the same tokens (checked). Also measures the verify-step
latency L(T) over the token-bucket menu beside the memory floor, in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORKLOAD = ROOT.parent / "shared" / "workloads" / "adaserve-artifact" / "rps2.4_ol256.json"
DEFAULT_POLICIES = (
    "autoregressive",
    "spec:1",
    "spec:2",
    "spec:3",
    "spec:4",
    "tree:2,2",
    "tree:3,2",
    "tree:4,2",
)


def coding_prompts(path: Path, n: int) -> list[str]:
    rows = json.loads(Path(path).read_text())
    prompts = [r["prompt"] for r in rows if r.get("slo_ratio") == 1.2]
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out[:n]


def run_policy(engine, prompts, policy, max_tokens):
    engine.generate(prompts, max_tokens=4, policy=policy)  # warm the host path
    t0 = time.perf_counter()
    outs = engine.generate(prompts, max_tokens=max_tokens, policy=policy)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    steps = sum(o.stats.steps for o in outs)
    accepted = sum(o.stats.accepted for o in outs)
    tpots = [o.tpot_s for o in outs if o.tpot_s]
    mean_tpot = float(np.mean(tpots)) if tpots else None
    return outs, {
        "tokens_per_s": tokens / seconds,
        # decoding rate of the batch: every request emits 1 / TPOT tokens per second once its
        # prefill is done (end-to-end tokens_per_s also pays for the prefill of every prompt)
        "decode_tokens_per_s": len(outs) / mean_tpot if mean_tpot else None,
        "seconds": seconds,
        "tokens": tokens,
        "mean_tpot_ms": 1e3 * mean_tpot if mean_tpot else None,
        "mean_accepted_per_step": (accepted + steps) / steps if steps else 1.0,
        "selected_per_step": sum(o.stats.selected for o in outs) / steps if steps else 0.0,
    }


def _median_row(rows: list[dict]) -> dict:
    """Per-key median over the repeats (None stays None); `runs` keeps every repeat's row."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        out[key] = None if None in vals else float(np.median(vals))
    out["runs"] = rows
    return out


def main(argv: list[str] | None = None) -> dict:
    from adaserve_jax import Engine, load_model
    from adaserve_jax.bench.step_latency import measure_bandwidth_gbs
    from adaserve_jax.engine.profiler import measure_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-len", type=int, default=160, help="keep the prompt's tail")
    ap.add_argument("--max-len", type=int, default=256, help="KV rows per slot")
    ap.add_argument("--token-buckets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument(
        "--ctx-buckets",
        type=int,
        nargs="+",
        default=[256],
        help="context buckets (max-len is always one): a step attends to the smallest that fits",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds over all policies; medians"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    policies = args.policy or list(DEFAULT_POLICIES)

    target, draft = load_model(args.target), load_model(args.draft)
    engine = Engine(
        target, draft, max_batch=max(args.batches), policies=policies, max_len=args.max_len,
        token_buckets=args.token_buckets, ctx_buckets=(*args.ctx_buckets, args.max_len),
    )  # fmt: skip
    prof = measure_profile(engine.target, engine.draft.device, expander=engine.draft, repeats=9)
    bw = measure_bandwidth_gbs()
    cfg = target.config
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves(target.params))
    kv_row = 2 * 4 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    floor = {t: (param_bytes + kv_row * 128) / (bw * 1e9) * 1e3 for t in prof.verify_ms}
    # the profile's steps attend 128 committed rows: that is the KV part of the floor
    result = {
        "target": args.target,
        "draft": args.draft,
        "max_tokens": args.max_tokens,
        "max_prompt_len": args.max_prompt_len,
        "ctx_buckets": list(engine.target.ctx_buckets),
        "repeats": args.repeats,
        "bandwidth_gbs": bw,
        "verify_ms": prof.verify_ms,
        "draft_ms": prof.draft_ms,
        "expand_ms": prof.expand_ms,
        "memory_floor_ms": floor,
        "batches": {},
    }
    tok = target.tokenizer
    prompts_all = [
        tok.encode(p)[-args.max_prompt_len :]
        for p in coding_prompts(Path(args.workload), max(args.batches))
    ]
    for batch in args.batches:
        prompts = prompts_all[:batch]
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        ref, same = None, {p: True for p in policies}
        for _ in range(args.repeats):  # rounds over all policies: slow phases of a shared
            for policy in policies:  # machine hit every policy alike
                outs, row = run_policy(engine, prompts, policy, args.max_tokens)
                ids = [o.token_ids for o in outs]
                ref = ids if ref is None else ref
                same[policy] &= ids == ref
                runs[policy].append(row)
        rows = {}
        for policy in policies:
            row = _median_row(runs[policy])
            row["same_tokens_as_first_policy"] = ids_same = same[policy]
            rows[policy] = row
            print(
                f"batch {batch:>2} {policy:<15} {row['tokens_per_s']:7.1f} tok/s end-to-end  "
                f"{row['decode_tokens_per_s'] or 0:7.1f} tok/s decoding (TPOT "
                f"{row['mean_tpot_ms'] or 0:.2f} ms)  accepted/step "
                f"{row['mean_accepted_per_step']:.2f}  same={ids_same}"
            )
        base = rows[policies[0]]
        for row in rows.values():
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            if row["decode_tokens_per_s"] and base["decode_tokens_per_s"]:
                row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        result["batches"][str(batch)] = rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, policies, args.plot)
    return result


def plot(result: dict, policies: list[str], path: str) -> None:
    from adaserve_jax.bench.plots import pyplot, save_figure

    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    ts = sorted(result["verify_ms"])
    ax0.plot(ts, [result["verify_ms"][t] for t in ts], "o-", label="verify step L(T)")
    if result.get("draft_ms"):
        ax0.plot(ts, [result["draft_ms"][t] for t in ts], "s-", label="draft step")
    ax0.plot(ts, [result["memory_floor_ms"][t] for t in ts], "k--", label="memory floor")
    ax0.set(xscale="log", xlabel="tokens per step T", ylabel="ms", title="step latency")
    ax0.legend()
    batches = list(result["batches"])
    width = 0.8 / len(batches)
    x = np.arange(len(policies))
    for i, b in enumerate(batches):
        rows = result["batches"][b]
        speed = [rows[p].get("decode_speedup", rows[p]["speedup"]) for p in policies]
        ax1.bar(x + i * width, speed, width, label=f"batch {b}")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks(x + width * (len(batches) - 1) / 2, policies, rotation=30)
    ax1.set(ylabel="decoding tokens/s vs autoregressive", title="greedy decoding speed (1 / TPOT)")
    ax1.legend()
    save_figure(plt, fig, path, dpi=110)


if __name__ == "__main__":
    main()
