"""Fixtures: a tiny model directory (per session) and a real `serve.py` (per module)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import AUTH_TOKEN, ServerProcess, make_model_dir

from adaserve_jax.client import Client


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("logs") / "server.log",
        "--auth-token", AUTH_TOKEN,
        "--drain-seconds", "2",
    )  # fmt: skip
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    c = Client(server.address, auth_token=AUTH_TOKEN)
    yield c
    c.close()
