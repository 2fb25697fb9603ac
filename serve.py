"""adaserve-jax entry point.

    python serve.py                          serve gRPC (adaserve.v1.Generation), 127.0.0.1:50051
    python serve.py --prompt "def fib(n):"   one-shot generation on the default model

Serving loads the shipped target/draft pair (`--target`, `--draft`; `--draft ''` for none),
listens at once with grpc.health.v1 NOT_SERVING, compiles every step variant (progress bar),
then reports SERVING. SIGTERM/SIGINT drain in-flight requests for `--drain-seconds`, then exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TARGET = ROOT / "checkpoints" / "target"
DEFAULT_DRAFT = ROOT / "checkpoints" / "draft"
log = logging.getLogger("adaserve.serve")


def _nonneg_float(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not val >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return val


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one int")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target model directory")
    p.add_argument(
        "--draft", default=str(DEFAULT_DRAFT), help="draft model directory ('' = no draft)"
    )
    p.add_argument("--prompt", help="generate a completion for this prompt and exit")
    p.add_argument("--max-tokens", type=int, default=64, help="(--prompt mode)")
    p.add_argument("--temperature", type=float, default=0.0, help="(--prompt mode)")
    p.add_argument("--top-p", type=float, default=1.0, help="(--prompt mode)")
    p.add_argument("--top-k", type=int, default=0, help="(--prompt mode)")
    p.add_argument("--seed", type=int, default=None, help="(--prompt mode)")
    p.add_argument(
        "--policy", default=None, help="default: adaserve with a draft, else autoregressive"
    )
    p.add_argument("--attention-impl", default="xla", choices=("xla", "pallas", "pallas_interpret"))
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--token-buckets", type=_ints, default=None, help="e.g. 1,4,16,64")
    p.add_argument("--ctx-buckets", type=_ints, default=None, help="e.g. 64,256")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="tensor-parallel over the first N devices (global count; docs/MESH.md)",
    )
    from adaserve_jax.engine.mesh import DistributedConfig

    DistributedConfig.add_arguments(p)  # --distributed --coordinator-address --num-processes ...
    g = p.add_argument_group("gRPC serving")
    g.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics; 0 = off")
    g.add_argument("--drain-seconds", type=float, default=30.0, help="SIGTERM grace period")
    g.add_argument("--max-workers", type=int, default=512, help="RPC threads (one per stream)")
    g.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    g.add_argument(
        "--stream-interval-ms",
        type=_nonneg_float,
        default=0.0,
        help="Generate sends at most one message per stream per interval (tokens merged); "
        "0 (default) = one message per loop iteration, subject to --stream-rate",
    )
    g.add_argument(
        "--stream-rate",
        type=_nonneg_float,
        default=200.0,
        help="message budget over all streams (messages/s): with S streams in flight each sends "
        "at most one message per S / rate seconds, tokens merged; 0 = no budget. Every message "
        "costs CPU the device step waits for (BENCHMARKS.md)",
    )
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument(
        "--auth-token",
        default=os.environ.get("ADASERVE_AUTH_TOKEN"),
        help="require 'authorization: Bearer TOKEN' (default: $ADASERVE_AUTH_TOKEN)",
    )
    g.add_argument("--no-progress", action="store_true", help="no warm-up progress bar")
    return p.parse_args(argv)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(attention_impl=args.attention_impl, max_batch=args.max_batch)
    if args.token_buckets:
        kw["token_buckets"] = args.token_buckets
    if args.ctx_buckets:
        kw["ctx_buckets"] = args.ctx_buckets
    if args.devices:
        kw["devices"] = args.devices
    return kw


def follow(args: argparse.Namespace) -> int:
    """A non-primary process of a multi-host job: build the same Engine, replay process 0."""
    from adaserve_jax import Engine, load_model

    target = load_model(args.target)
    if args.prompt is not None:  # mirrors one_shot()
        engine = Engine(target, **_engine_kwargs(args))
    else:  # mirrors serve()
        draft = load_model(args.draft) if args.draft else None
        policy = args.policy or ("adaserve" if args.draft else "autoregressive")
        engine = Engine(
            target, draft, policy=policy, max_queue=args.max_queue, progress=False,
            **_engine_kwargs(args),
        )  # fmt: skip
    engine.follow()
    return 0


def one_shot(args: argparse.Namespace) -> int:
    from adaserve_jax import Engine, load_model

    try:
        target = load_model(args.target)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(target, **_engine_kwargs(args))
    start = time.perf_counter()
    try:
        (out,) = engine.generate(
            [args.prompt],
            max_tokens=args.max_tokens,
            policy=args.policy or "autoregressive",
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.stop_followers()
    seconds = time.perf_counter() - start
    print(args.prompt + (out.text if out.text is not None else str(out.token_ids)))
    n = len(out.token_ids)
    print(
        f"\n[{n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s; "
        f"finish_reason={out.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    for name, path in (("target", args.target), ("draft", args.draft)):
        if path and not Path(path).is_dir():
            hint = " (the shipped pair is still being trained?)" if "checkpoints" in path else ""
            print(
                f"error: {name} model directory {path} does not exist{hint}; pass --{name} DIR"
                + (" or --draft '' to serve without speculation" if name == "draft" else ""),
                file=sys.stderr,
            )
            return 2
    policy = args.policy or ("adaserve" if args.draft else "autoregressive")
    from adaserve_jax import __version__
    from adaserve_jax.server.app import GrpcServer, ServerConfig
    from adaserve_jax.server.metrics import ServerMetrics
    from adaserve_jax.server.servicer import GenerationServicer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            max_workers=args.max_workers,
            max_concurrent_rpcs=max(1, args.max_workers - 32),
            max_message_bytes=args.max_message_bytes,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            auth_token=args.auth_token,
            metrics_port=args.metrics_port,
        )
        servicer = GenerationServicer(
            policy=policy,
            metrics=ServerMetrics(),
            version=__version__,
            stream_interval_s=args.stream_interval_ms / 1e3,
            stream_rate=args.stream_rate,
        )
        server = GrpcServer(config, servicer)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server.start()
    tls = "TLS" if args.tls_cert else "plaintext"
    log.info("listening on %s:%d (%s); warming up, health NOT_SERVING", args.host, server.port, tls)

    from adaserve_jax import Engine, load_model

    try:
        target = load_model(args.target)
        draft = load_model(args.draft) if args.draft else None
        engine = Engine(
            target,
            draft,
            policy=policy,
            max_queue=args.max_queue,
            progress=not args.no_progress,
            **_engine_kwargs(args),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.drain(0)
        return 2
    server.set_engine(engine)
    log.info(
        "serving adaserve.v1.Generation on %s:%d (policy=%s, slots=%d, baseline TPOT %.1f ms)",
        args.host,
        server.port,
        policy,
        engine.num_slots,
        engine.baseline_tpot_ms,
    )
    while not stop.wait(0.5):
        pass
    log.info("draining: up to %.1f s for in-flight requests", args.drain_seconds)
    finished = server.drain(args.drain_seconds)
    engine.stop_followers()
    log.info("stopped (%s)", "drained" if finished else "grace period over: cancelled the rest")
    # RPC worker threads still blocked on a cancelled request must not hold up the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax restore chatter
    from adaserve_jax.engine.mesh import DistributedConfig, initialize_distributed, is_primary

    try:
        initialize_distributed(DistributedConfig.from_args(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_primary():
        return follow(args)
    if args.prompt is not None:
        return one_shot(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
