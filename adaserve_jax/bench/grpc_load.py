"""gRPC load test: streaming requests at several concurrency levels (loopback only, bounded).

    python -m adaserve_jax.bench.grpc_load --target checkpoints/target --draft ''
    python -m adaserve_jax.bench.grpc_load --random-model target_small --concurrency 1,16,64,200

Starts `serve.py` on a free loopback port (or uses `--address 127.0.0.1:PORT`), then for each
concurrency level `c` runs `max(c, --requests)` streaming requests from `c` client threads
(closed loop) and reports requests/s, SLO attainment, TTFT/TPOT/latency p50/p99, errors and
whether any KV slot leaked (ServerInfo after the level). With `--overhead-concurrency 16` it also
runs the same requests on an in-process `Engine` (same model, buckets, policy) and reports the
server overhead: (TPOT via gRPC - TPOT in-process) / TPOT via gRPC, TPOT measured by the caller
(first to last token it received), twice: against the `serve.py` process, and against a gRPC
server started in this process around the in-process engine (`same_engine`: only the gRPC path
differs). Results go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(slots=True)
class Sample:
    """What the caller saw of one request (seconds, perf_counter clock)."""

    start: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    attained: bool | None = None
    error: str | None = None

    def tpot(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) * 1000 if xs else None


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    tpots = [t for s in ok if (t := s.tpot()) is not None]
    ttfts = [s.first - s.start for s in ok if s.first is not None]
    lat = [s.last - s.start for s in ok if s.last is not None]
    slo = [s.attained for s in ok if s.attained is not None]
    return {
        "requests": len(samples),
        "completed": len(ok),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": sum(s.tokens for s in ok) / wall if wall > 0 else None,
        "attainment": sum(slo) / len(slo) if slo else None,
        "ttft_ms_p50": _pct(ttfts, 50),
        "ttft_ms_p99": _pct(ttfts, 99),
        "tpot_ms_mean": float(np.mean(tpots)) * 1000 if tpots else None,
        "tpot_ms_p50": _pct(tpots, 50),
        "tpot_ms_p99": _pct(tpots, 99),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p99": _pct(lat, 99),
    }


def make_prompts(n: int, vocab: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=length).tolist() for _ in range(n)]


def _cpu_s(pid: int | None) -> float | None:
    """utime + stime of process `pid` (Linux /proc), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return None


def closed_loop(
    prompts: list[list[int]], concurrency: int, one, deadline: float, server_pid: int | None = None
) -> dict:
    """Run `one(prompt) -> Sample` over `prompts` from `concurrency` threads.

    Also reports the CPU seconds this (client) process and the server process used.
    """
    samples: list[Sample] = []
    lock = threading.Lock()
    it = iter(prompts)

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                prompt = next(it, None)
            if prompt is None:
                return
            s = one(prompt)
            with lock:
                samples.append(s)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0, cpu0, srv0 = time.perf_counter(), _cpu_s(os.getpid()), _cpu_s(server_pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + 5)
    out = summarize(samples, time.perf_counter() - t0)
    cpu1, srv1 = _cpu_s(os.getpid()), _cpu_s(server_pid)
    out["client_process_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    out["server_process_cpu_s"] = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    return out


def grpc_one(client, args: argparse.Namespace):
    from adaserve_jax.client import build_request

    def one(prompt: list[int]) -> Sample:
        req = build_request(prompt, max_tokens=args.max_tokens, category=args.category)
        s = Sample(time.perf_counter())
        try:
            for msg in client.generate(req, timeout=args.request_timeout):
                now = time.perf_counter()
                if msg.token_ids:
                    s.first = s.first if s.first is not None else now
                    s.last, s.tokens = now, s.tokens + len(msg.token_ids)
                if msg.HasField("finish") and msg.finish.HasField("slo_attained"):
                    s.attained = msg.finish.slo_attained
        except Exception as exc:  # noqa: BLE001 - counted as an error of this request
            s.error = f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()}"
        return s

    return one


def engine_one(engine, args: argparse.Namespace):
    slo_ms = engine.category_slo_ms(args.category)
    lock = threading.Lock()  # Engine.submit creates its serving loop lazily, not thread-safely

    def one(prompt: list[int]) -> Sample:
        s = Sample(time.perf_counter())
        try:
            req = engine.make_request(prompt, max_tokens=args.max_tokens, tpot_slo_ms=slo_ms)
            with lock:
                handle = engine.submit(req)
            for tokens in handle:
                now = time.perf_counter()
                s.first = s.first if s.first is not None else now
                s.last, s.tokens = now, s.tokens + len(tokens)
            state = handle.wait(args.request_timeout)
            if str(state.finish_reason) == "error":
                raise RuntimeError(state.error)
            s.attained = state.attained()
        except Exception as exc:  # noqa: BLE001
            s.error = f"{type(exc).__name__}: {exc}"
        return s

    return one


def wait_idle(client, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        info = client.server_info()
        idle = info.slots_in_use == 0 and info.queue_depth == 0 and info.running == 0
        if idle or time.monotonic() > end:
            return {"slots_in_use": info.slots_in_use, "queue_depth": info.queue_depth}
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_model(kind: str, directory: Path) -> Path:
    import jax

    from adaserve_jax.model import ModelConfig, init_params
    from adaserve_jax.model.checkpoint import save_model_dir

    cfg = getattr(ModelConfig, kind)(max_seq_len=256)
    path = directory / kind
    save_model_dir(path, jax.tree.map(np.asarray, init_params(cfg, 0)), cfg)
    return path


def _buckets(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default=str(ROOT / "checkpoints" / "target"))
    p.add_argument("--draft", default="", help="draft model dir ('' = none)")
    p.add_argument("--random-model", choices=("tiny", "target_small"), help="instead of --target")
    p.add_argument("--policy", default=None)
    p.add_argument("--address", help="use this running server (loopback only)")
    p.add_argument("--auth-token", default=None)
    p.add_argument("--concurrency", type=_buckets, default=(1, 16, 64, 200), help="'' = none")
    p.add_argument("--requests", type=int, default=32, help="per level (at least the level)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--category", default="summarization")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--stream-interval-ms", type=float, default=0.0, help="serve.py's message interval"
    )
    p.add_argument(
        "--stream-rate",
        type=float,
        default=200.0,
        help="serve.py's message budget over all streams (messages/s; 0 = none)",
    )
    p.add_argument("--token-buckets", default="1,4,16,64")
    p.add_argument("--ctx-buckets", default="64,256")
    p.add_argument("--overhead-concurrency", type=int, default=16, help="0 = skip in-process")
    p.add_argument("--overhead-reps", type=int, default=2)
    p.add_argument("--level-seconds", type=float, default=300.0, help="time bound per level")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(ROOT / "runs" / "grpc_load.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adaserve_jax.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="grpc_load-"))
    target = str(_random_model(args.random_model, tmp)) if args.random_model else args.target
    policy = args.policy or ("adaserve" if args.draft else "autoregressive")
    proc = None
    if args.address:
        host = args.address.rsplit(":", 1)[0].strip("[]")
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            print(f"error: {args.address} is not a loopback address", file=sys.stderr)
            return 2
        address = args.address
    else:
        port = _free_port()
        address = f"127.0.0.1:{port}"
        cmd = [
            sys.executable, str(ROOT / "serve.py"), "--target", target, "--draft", args.draft,
            "--policy", policy, "--port", str(port), "--metrics-port", "0",
            "--max-batch", str(args.max_batch), "--token-buckets", args.token_buckets,
            "--ctx-buckets", args.ctx_buckets, "--no-progress", "--drain-seconds", "5",
            "--stream-interval-ms", str(args.stream_interval_ms),
            "--stream-rate", str(args.stream_rate),
        ]  # fmt: skip
        log = open(tmp / "server.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = Client(address, auth_token=args.auth_token)
    server_pid = proc.pid if proc is not None else None
    result: dict = {
        "address": address,
        "policy": policy,
        "target": target,
        "stream_interval_ms": args.stream_interval_ms,
        "stream_rate": args.stream_rate,
        "levels": [],
    }
    try:
        end = time.monotonic() + 900
        while True:  # until SERVING (warm)
            try:
                info = client.server_info(timeout=5)
                break
            except Exception:  # noqa: BLE001 - UNAVAILABLE while warming up
                if proc is not None and proc.poll() is not None or time.monotonic() > end:
                    print(f"error: server did not come up; see {tmp / 'server.log'}")
                    return 1
                time.sleep(1)
        vocab = info.target.vocab_size
        result["slots_total"] = info.slots_total
        result["baseline_tpot_ms"] = info.baseline_tpot_ms
        for c in args.concurrency:
            prompts = make_prompts(max(c, args.requests), vocab, args.prompt_len, seed=c)
            deadline = time.perf_counter() + args.level_seconds
            level = closed_loop(prompts, c, grpc_one(client, args), deadline, server_pid)
            level.update(concurrency=c, after=wait_idle(client))
            level["leaked_slots"] = level["after"]["slots_in_use"]
            result["levels"].append(level)
            print(json.dumps({k: level[k] for k in _SHOW}), flush=True)
        if args.overhead_concurrency:
            result["overhead"] = overhead(args, client, target, policy, vocab, server_pid)
            print(json.dumps(result["overhead"]), flush=True)
    finally:
        client.close()
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


_SHOW = ("concurrency", "completed", "errors", "requests_per_s", "attainment", "tpot_ms_mean",
         "latency_ms_p99", "ttft_ms_p99", "leaked_slots")  # fmt: skip


def overhead(
    args: argparse.Namespace, client, target: str, policy: str, vocab: int, server_pid: int | None
) -> dict:
    """Same requests at the same concurrency: via gRPC vs an in-process Engine (alternating)."""
    from adaserve_jax import Engine, load_model

    c = args.overhead_concurrency
    draft = load_model(args.draft) if args.draft else None
    engine = Engine(
        load_model(target),
        draft,
        policy=policy,
        max_batch=args.max_batch,
        token_buckets=_buckets(args.token_buckets),
        ctx_buckets=_buckets(args.ctx_buckets),
        progress=False,
    )
    prompts = make_prompts(max(c, args.requests), vocab, args.prompt_len, seed=1000 + c)
    runs = alternate(args, engine, client, prompts, server_pid)
    same = same_engine_overhead(args, engine, prompts)
    engine.service.shutdown(5)
    out = {"concurrency": c, **tpot_overhead(runs)}  # wall clock: noisy on a shared machine
    srv = [r["server_process_cpu_s"] for r in runs["grpc"]]
    if None not in srv:
        # CPU seconds for the same requests: server process (gRPC + loop + device) vs the
        # in-process run (loop + device + its caller threads). Steadier than wall clock here.
        cpu_g = float(np.median(srv))
        cpu_e = float(np.median([r["client_process_cpu_s"] for r in runs["in_process"]]))
        cpu_c = float(np.median([r["client_process_cpu_s"] for r in runs["grpc"]]))
        out.update(
            server_cpu_s=cpu_g,
            in_process_cpu_s=cpu_e,
            grpc_client_cpu_s=cpu_c,
            cpu_overhead_share=(cpu_g - cpu_e) / cpu_g,
        )
    out["runs"] = runs
    out["same_engine"] = same
    return out


def same_engine_overhead(args: argparse.Namespace, engine, prompts: list[list[int]]) -> dict:
    """The same comparison on one engine: a gRPC server started in this process around the
    in-process `Engine` (real server, real clients over 127.0.0.1), alternating with direct
    `Engine.submit` calls. Only the gRPC path differs (the cross-process runs above also
    compare two engine instances in two processes); the clients' threads share the server's
    process here, which counts against gRPC."""
    from adaserve_jax.client import Client
    from adaserve_jax.server.app import GrpcServer, ServerConfig
    from adaserve_jax.server.servicer import GenerationServicer

    servicer = GenerationServicer(
        policy=engine.policy.name,
        stream_interval_s=args.stream_interval_ms / 1e3,
        stream_rate=args.stream_rate,
    )
    server = GrpcServer(ServerConfig(port=_free_port(), metrics_port=0), servicer)
    server.start()
    server.set_engine(engine)
    client = Client(f"127.0.0.1:{server.port}")
    try:
        runs = alternate(args, engine, client, prompts)
    finally:
        client.close()
        server.server.stop(5).wait(10)
    return {**tpot_overhead(runs), "runs": runs}


def alternate(args, engine, client, prompts, server_pid: int | None = None) -> dict:
    """`--overhead-reps` rounds of the same requests: in-process `Engine`, then via gRPC."""
    c = args.overhead_concurrency
    runs: dict[str, list[dict]] = {"grpc": [], "in_process": []}
    for _ in range(args.overhead_reps):
        deadline = time.perf_counter() + args.level_seconds
        runs["in_process"].append(closed_loop(prompts, c, engine_one(engine, args), deadline))
        deadline = time.perf_counter() + args.level_seconds
        runs["grpc"].append(closed_loop(prompts, c, grpc_one(client, args), deadline, server_pid))
    return runs


def tpot_overhead(runs: dict) -> dict:
    """Median TPOT of each side and (gRPC - in-process) / gRPC."""
    g = float(np.median([r["tpot_ms_mean"] for r in runs["grpc"]]))
    e = float(np.median([r["tpot_ms_mean"] for r in runs["in_process"]]))
    return {"tpot_ms_grpc": g, "tpot_ms_in_process": e, "overhead_share": (g - e) / g}


if __name__ == "__main__":
    sys.exit(main())
