"""adaserve-jax entry point.

    python serve.py --prompt "def fib(n):"     one-shot generation on the default model

(gRPC serving arrives with its own issue; until then `--prompt` is required.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TARGET = ROOT / "checkpoints" / "target"
DEFAULT_DRAFT = ROOT / "checkpoints" / "draft"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target model directory")
    p.add_argument("--prompt", help="generate a completion for this prompt and exit")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--policy", default="autoregressive")
    p.add_argument("--attention-impl", default="xla", choices=("xla", "pallas", "pallas_interpret"))
    p.add_argument("--max-batch", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from adaserve_jax import Engine, load_model

    if args.prompt is None:
        print("error: --prompt is required until gRPC serving lands", file=sys.stderr)
        return 2
    try:
        target = load_model(args.target)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(target, attention_impl=args.attention_impl, max_batch=args.max_batch)
    start = time.perf_counter()
    try:
        (out,) = engine.generate(
            [args.prompt],
            max_tokens=args.max_tokens,
            policy=args.policy,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(args.prompt + (out.text if out.text is not None else str(out.token_ids)))
    n = len(out.token_ids)
    print(
        f"\n[{n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s; "
        f"finish_reason={out.finish_reason}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
