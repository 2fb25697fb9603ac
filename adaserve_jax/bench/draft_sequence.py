"""What the draft's calls cost alone and in their serving sequence.

    python -m adaserve_jax.bench.draft_sequence [--tokens 1 4 16] [--rows 1 4]
        [--repeats 30] [--json OUT]

A speculative iteration runs verify -> draft step -> expansion -> verify. Timed alone, a draft
call finds the draft's weights and buffers warm from the call before; in serving the target's
step ran in between. For each draft step size and each expansion shape and row count this
times the call (a low quantile and the median of `--repeats`, engine/profiler.py `time_calls`)
alone, and right after what precedes it in serving (the profiler's own `verify_step_before`
and `calls_before_expansion`): a target step of its size (draft step), a target step and a
draft step over its rows (expansion). Also the target step alone and after
a draft step. The start-up profile times the draft's calls in sequence (engine/profiler.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adaserve_jax.bench.speculation import ROOT
from adaserve_jax.engine.profiler import (
    calls_before_expansion,
    expand_call,
    expansion_shapes,
    low_quantile_ms,
    step_call,
    time_calls,
    verify_step_before,
)


def _times_ms(call, repeats: int, before=None) -> dict:
    """{"low": the profiler's low quantile, "median"} of `repeats` timed calls (ms)."""
    times = time_calls(call, repeats, before)
    return {"low": low_quantile_ms(times), "median": statistics.median(times) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    from adaserve_jax import Engine, load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "checkpoints" / "draft"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    engine = Engine(
        load_model(args.target),
        load_model(args.draft),
        max_batch=8,
        token_budget=64,
        policies=["adaserve", "spec:2"],
        token_buckets=(1, 2, 4, 8, 16, 32, 64),
        ctx_buckets=(256,),
        profile=False,
    )
    target, expander = engine.target, engine.draft
    draft = expander.device
    if any(t not in draft.token_buckets for t in args.tokens):
        ap.error(f"--tokens must be draft token buckets {draft.token_buckets}")
    if any(r < 1 or r > draft.num_slots for r in args.rows):
        ap.error(f"--rows must lie in [1, {draft.num_slots}]")
    context = 128
    rows_out = []
    for t in args.tokens:
        d = step_call(draft, t, context, "topk_last")
        v = verify_step_before(target, t, context)
        row = {
            "call": f"draft step T={t}",
            "alone": _times_ms(d, args.repeats),
            "in_sequence": _times_ms(d, args.repeats, before=v),
            "target_alone": _times_ms(v, args.repeats),
            "target_after_draft": _times_ms(v, args.repeats, before=d),
        }
        rows_out.append(row)
    for shape in expansion_shapes(expander):
        for r in args.rows:
            call = expand_call(expander, shape, r, context)
            before = calls_before_expansion(target, expander, shape, r, context)
            rows_out.append(
                {
                    "call": f"expand {shape.depth},{shape.width},{shape.topk} rows={r}",
                    "alone": _times_ms(call, args.repeats),
                    "in_sequence": _times_ms(call, args.repeats, before=before),
                }
            )
    for row in rows_out:
        a, q = row["alone"], row["in_sequence"]
        line = (
            f"{row['call']:<26} alone {a['low']:6.2f} / {a['median']:6.2f} ms   in sequence "
            f"{q['low']:6.2f} / {q['median']:6.2f} ms ({q['low'] / a['low']:.2f}x)"
        )
        if "target_alone" in row:
            ta, td = row["target_alone"], row["target_after_draft"]
            line += f"   target alone {ta['low']:.2f}, after the draft {td['low']:.2f} ms"
        print(line, flush=True)
    out = {"repeats": args.repeats, "context": context, "rows": rows_out}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
