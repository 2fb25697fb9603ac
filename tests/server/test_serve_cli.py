"""serve.py: clear errors for missing models; the one-shot --prompt mode still works."""

from __future__ import annotations

import subprocess
import sys

from server_process import ROOT

SERVE = [sys.executable, str(ROOT / "serve.py")]


def test_missing_models_fail_clearly(tmp_path):
    out = subprocess.run(
        [*SERVE, "--target", str(tmp_path / "nope"), "--port", "0"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "target model directory" in out.stderr
    assert "--target" in out.stderr
    out = subprocess.run(
        [*SERVE, "--target", str(tmp_path), "--draft", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "draft model directory" in out.stderr


def test_one_shot_prompt(model_dir):
    out = subprocess.run(
        [*SERVE, "--prompt", "def fib(n):", "--target", str(model_dir), "--max-tokens", "8",
         "--token-buckets", "1,4,16,64", "--ctx-buckets", "64,256", "--max-batch", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def fib(n):")
    assert "tokens/s" in out.stderr
