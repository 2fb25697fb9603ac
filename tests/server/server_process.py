"""Helpers of the server tests: a tiny model directory and a `serve.py` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
AUTH_TOKEN = "test-token-123"
MAX_BATCH = 4
POLICY = "spec:2"  # speculative: stream messages carry up to 3 tokens
TRAIN_TEXT = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "héllo wörld, naïve café — ✓ 日本語 テキスト",
    "the quick brown fox jumps over the lazy dog",
] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(path: Path) -> Path:
    """A tiny random model (vocab 384) + a byte-level BPE tokenizer trained on a few strings."""
    import jax
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from adaserve_jax.model import ModelConfig, init_params
    from adaserve_jax.model.checkpoint import save_model_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    cfg = ModelConfig.tiny(vocab_size=384)
    params = jax.tree.map(
        lambda x: np.asarray(x) * (4.0 if x.ndim == 2 else 1.0), init_params(cfg, 1)
    )
    save_model_dir(path, params, cfg)
    tok.save(str(path / "tokenizer.json"))
    return path


class ServerProcess:
    def __init__(self, model_dir: Path, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        cmd = [
            sys.executable,
            str(ROOT / "serve.py"),
            "--target", str(model_dir),
            "--draft", str(model_dir),  # the target as its own draft: greedy accepts all
            "--policy", POLICY,
            "--port", str(self.port),
            "--metrics-port", str(self.metrics_port),
            "--token-buckets", "1,4,16,64",
            "--ctx-buckets", "64,256",
            "--max-batch", str(MAX_BATCH),
            "--max-queue", "128",
            "--stream-interval-ms", "0",  # one message per loop iteration (tests count them)
            "--stream-rate", "0",
            "--no-progress",
            *extra,
        ]  # fmt: skip
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 600.0) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
            raise TimeoutError(f"server not SERVING after {timeout} s")
        finally:
            channel.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
