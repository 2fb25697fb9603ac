"""The checked-in stubs are what scripts/gen_proto.sh generates from adaserve.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("adaserve_pb2.py", "adaserve_pb2_grpc.py")


def test_stubs_are_current(tmp_path):
    env_py = {"PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env=env_py | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "adaserve_jax" / "server" / name).read_text()
        checked_in = (ROOT / "adaserve_jax" / "server" / name).read_text()
        assert fresh == checked_in, f"{name} is stale: run scripts/gen_proto.sh"
