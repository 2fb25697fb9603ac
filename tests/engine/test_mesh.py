"""Tensor parallelism: sharding rules, start-up validation, multi-host flags, and (in a
subprocess with 4 forced CPU devices) token-identical generation vs one device."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from adaserve_jax import Engine, ModelConfig
from adaserve_jax.engine.mesh import DistributedConfig, initialize_distributed, make_mesh
from adaserve_jax.model import init_params
from adaserve_jax.model.sharding import (
    TP,
    check_divisible,
    param_path,
    param_spec,
    param_specs,
    shards_vocab,
)

CASES = Path(__file__).parent / "mesh_cases"
DEVICES = 4


# ---- rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec",
    [
        ("embed_tokens", P(TP, None)),
        ("layers_3/self_attn/q_proj/kernel", P(None, TP)),
        ("layers_3/self_attn/k_proj/kernel", P(None, TP)),
        ("layers_3/self_attn/v_proj/bias", P(TP)),
        ("layers_3/self_attn/o_proj/kernel", P(TP, None)),
        ("layers_0/mlp/gate_proj/kernel", P(None, TP)),
        ("layers_0/mlp/up_proj/kernel", P(None, TP)),
        ("layers_0/mlp/down_proj/kernel", P(TP, None)),
        ("lm_head/kernel", P(None, TP)),
        ("layers_0/input_layernorm/weight", P()),
        ("norm/weight", P()),
    ],
)
def test_param_rules(name, spec):
    assert param_spec(name, len(spec) or 1) == spec


def test_every_parameter_has_a_rule_and_vocab_falls_back_to_replicated():
    cfg = ModelConfig.tiny(vocab_size=255, qkv_bias=True, num_heads=4, num_kv_heads=2)
    specs = param_specs(init_params(cfg), cfg, 2)
    flat = {param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=_spec)}
    assert flat["layers_1/self_attn/q_proj/bias"] == P(TP)
    assert not shards_vocab(cfg, 2) and flat["embed_tokens"] == P()
    assert flat["lm_head/kernel"] == P()
    with pytest.raises(ValueError, match="no sharding rule for parameter 'layers_0/new/w'"):
        param_spec("layers_0/new/w", 2)


def _spec(x) -> bool:
    return isinstance(x, P)


@pytest.mark.parametrize(
    "overrides, devices, field",
    [
        (dict(num_heads=4, num_kv_heads=2), 4, "num_kv_heads=2"),
        (dict(num_heads=6, num_kv_heads=6, hidden_size=48), 4, "num_heads=6"),
        (dict(intermediate_size=130), 4, "intermediate_size=130"),
    ],
)
def test_indivisible_counts_are_rejected(overrides, devices, field):
    cfg = ModelConfig.tiny(**{"num_heads": 4, "num_kv_heads": 4, **overrides})
    with pytest.raises(ValueError, match=f"devices={devices} does not divide the model's {field}"):
        check_divisible(cfg, devices)


def test_engine_rejects_more_devices_than_exist(tiny_model):
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"devices={n} but only {n - 1} cpu device"):
        Engine(tiny_model, warmup=False, progress=False, devices=n)
    with pytest.raises(ValueError, match="devices=0 must be a positive int"):
        make_mesh(0)


# ---- multi-host flags ------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    DistributedConfig.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_distributed_config_from_flags_and_env():
    env = {
        "ADASERVE_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "ADASERVE_NUM_PROCESSES": "4",
        "ADASERVE_PROCESS_ID": "2",
    }
    assert DistributedConfig.from_env(env) == DistributedConfig("on", "10.0.0.1:1234", 4, 2)
    cfg = DistributedConfig.from_args(_args("--process-id", "3"), env)
    assert cfg == DistributedConfig("on", "10.0.0.1:1234", 4, 3)  # flags win
    assert DistributedConfig.from_args(_args(), {}) == DistributedConfig()
    assert DistributedConfig.from_args(_args("--distributed", "auto"), {}).mode == "auto"
    assert not initialize_distributed(DistributedConfig())  # off: a no-op


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--coordinator-address", "host"), "must be 'host:port'"),
        (("--coordinator-address", "h:1", "--num-processes", "2"), "process_id=None"),
        (("--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"), "in \\[0"),
        (("--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"), "positive"),
    ],
)
def test_distributed_config_rejects_bad_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig.from_args(_args(*argv), {})


def test_distributed_env_must_be_int():
    with pytest.raises(ValueError, match="num_processes='two' must be an int"):
        DistributedConfig.from_env({"ADASERVE_NUM_PROCESSES": "two"})


# ---- 4 CPU devices in a subprocess -----------------------------------------------------


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mesh") / "tp.json"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(CASES / "tp_equivalence.py"), str(DEVICES), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("policy", ["autoregressive", "spec:2"])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_tensor_parallel_is_token_identical(tp_run, policy, sampling):
    assert tp_run["device_count"] == DEVICES
    key = f"{policy}/{sampling}"
    assert tp_run["mesh"][key] == tp_run["single"][key]
    # and speculation stays lossless on the mesh
    assert tp_run["mesh"][key] == tp_run["mesh"][f"autoregressive/{sampling}"]


def test_tensor_parallel_never_retraces(tp_run):
    assert tp_run["mesh_again_identical"] and tp_run["retraced"] == 0


def test_params_and_caches_are_split(tp_run):
    shapes = tp_run["shard_shapes"]  # tiny: D=64, F=128, V=256, H=KVH=4, Dh=16, 3 slots
    assert shapes["q_proj"] == [64, 64 // DEVICES]
    assert shapes["o_proj"] == [64 // DEVICES, 64]
    assert shapes["up_proj"] == [64, 128 // DEVICES]
    assert shapes["down_proj"] == [128 // DEVICES, 64]
    assert shapes["embed_tokens"] == [256 // DEVICES, 64]
    assert shapes["lm_head"] == [64, 256 // DEVICES]
    assert shapes["norm"] == [64]
    assert shapes["k_cache"] == [3, 256, 4 // DEVICES, 16]
    assert shapes["draft_k_cache"] == [3, 256, 4 // DEVICES, 16]


def test_pallas_kernel_per_shard_matches_reference(tp_run):
    assert tp_run["pallas_max_err"] < 1e-5
    # and inside the sharded flat step (cache writes, prefill + tree), vs XLA on one device
    assert tp_run["pallas_engine_max_err"] < 1e-4


def test_bad_device_counts_fail_at_start_up(tp_run):
    errors = tp_run["errors"]
    assert errors["too_many"].startswith(f"devices={2 * DEVICES} but only {DEVICES} cpu")
    assert errors["heads"].startswith("target: devices=4 does not divide the model's num_heads=6")
    assert errors["zero"] == "devices=0 must be a positive int"


# ---- 2 processes x 2 CPU devices through jax.distributed ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multihost_processes_share_one_mesh_and_match_one_device(tp_run, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    port = str(_free_port())
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(CASES / "multihost.py"), str(i), "2", port, str(outs[i])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=900)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["primary"] for r in results] == [True, False]
    assert all(r["devices"] == 4 for r in results)
    assert results[0]["tokens"] == tp_run["single"]
    assert results[1]["replayed"] > 0 and "tokens" not in results[1]
