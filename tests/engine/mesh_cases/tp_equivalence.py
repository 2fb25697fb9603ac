"""Run in a subprocess by tests/engine/test_mesh.py: XLA must see N CPU devices before jax loads.

usage: python tp_equivalence.py DEVICES OUT.json

Generates with one device and with a DEVICES-way tensor-parallel mesh (same tiny target and
draft, same prompts) under autoregressive and spec:2, greedy and seeded sampling; checks the
Pallas kernel per shard against the reference; writes everything the test asserts as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import BUCKETS, generate_all, tiny  # noqa: E402

from adaserve_jax import Engine  # noqa: E402
from adaserve_jax.engine.mesh import make_mesh, shard_attention  # noqa: E402
from adaserve_jax.model import Model  # noqa: E402


def shard_shapes(engine: Engine) -> dict[str, list[int]]:
    p = engine.target._params
    picks = {
        "q_proj": p["layers_0"]["self_attn"]["q_proj"]["kernel"],
        "o_proj": p["layers_0"]["self_attn"]["o_proj"]["kernel"],
        "up_proj": p["layers_0"]["mlp"]["up_proj"]["kernel"],
        "down_proj": p["layers_0"]["mlp"]["down_proj"]["kernel"],
        "embed_tokens": p["embed_tokens"],
        "lm_head": p["lm_head"]["kernel"],
        "norm": p["norm"]["weight"],
        "k_cache": engine.target._caches[0][0],
        "draft_k_cache": engine.draft.device._caches[0][0],
    }
    return {k: list(v.addressable_shards[0].data.shape) for k, v in picks.items()}


def pallas_per_shard() -> float:
    """Max |kernel under shard_map (interpret) - reference on one device|."""
    from pallas_kernels.tree_attention import tree_attention, tree_attention_reference

    rng = np.random.default_rng(0)
    t, h, kvh, d, s, length = 16, 8, 4, 16, 3, 64
    q = rng.standard_normal((t, h, d), np.float32)
    kc, vc = (rng.standard_normal((s, length, kvh, d), np.float32) for _ in range(2))
    kn, vn = (rng.standard_normal((t, kvh, d), np.float32) for _ in range(2))
    slot = np.repeat(np.array([0, 2, 1, -1], np.int32), 4)
    ctx = np.array([10] * 4 + [0] * 4 + [33] * 4 + [0] * 4, np.int32)
    mask = np.zeros((t, t), bool)
    for b in range(4):  # a chain per request, padding attends to itself
        mask[4 * b : 4 * b + 4, 4 * b : 4 * b + 4] = np.tril(np.ones((4, 4), bool))
    args = (q, kc, vc, kn, vn, slot, ctx, mask)
    ref = tree_attention_reference(*map(jnp.asarray, args), attended_len=length)
    mesh = make_mesh(DEVICES)

    def kernel(*a, attended_len):
        return tree_attention(*a, attended_len=attended_len, interpret=True, block_q=8)

    sharded = jax.jit(shard_attention(kernel, mesh), static_argnames="attended_len")
    out = sharded(*args, attended_len=length)
    assert out.sharding.spec[1] == "tp", out.sharding
    return float(jnp.abs(out - ref).max())


def pallas_engine_step(target: Model) -> float:
    """Max |logits| difference: target step with Pallas (interpret) per shard vs XLA, 1 device."""
    from adaserve_jax.engine.batch import Segment
    from adaserve_jax.engine.device import DeviceModel

    kw = dict(num_slots=2, max_len=256, token_buckets=(16,), ctx_buckets=(64,), heads=("logits",))
    one = DeviceModel(target, attention_impl="xla", **kw)
    tp = DeviceModel(target, attention_impl="pallas_interpret", mesh=make_mesh(DEVICES), **kw)
    err = 0.0
    steps = [  # prefill two requests, then a decode token and a 3-node tree on top
        [Segment.chain(0, 0, list(range(3, 14))), Segment.chain(1, 0, [5, 6, 7])],
        [
            Segment.chain(0, 11, [9]),
            Segment(1, 3, np.array([1, 2, 4], np.int32), np.array([-1, 0, 0], np.int32)),
        ],
    ]
    for segs in steps:
        (a, _), (b, _) = one.run(segs, head="logits"), tp.run(segs, head="logits")
        err = max(err, float(np.abs(a - b).max()))
    return err


def bad_inputs(target: Model) -> dict[str, str]:
    errors = {}
    odd = tiny(3, num_heads=6, num_kv_heads=3, hidden_size=48)
    cases = {
        "too_many": (target, dict(devices=DEVICES * 2)),
        "heads": (odd, dict(devices=DEVICES)),
        "zero": (target, dict(devices=0)),
    }
    for name, (model, kw) in cases.items():
        try:
            Engine(model, max_batch=3, warmup=False, progress=False, **BUCKETS, **kw)
            errors[name] = "no error"
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


def main() -> None:
    target = tiny(1)
    draft = tiny(2, num_layers=1)
    result: dict = {"device_count": jax.device_count()}
    kw = dict(max_batch=3, token_budget=64, progress=False, policies=("spec:2",), **BUCKETS)
    start = time.perf_counter()
    single = Engine(target, draft, warmup=False, **kw)
    result["single"] = generate_all(single)
    del single
    result["single_s"] = time.perf_counter() - start
    start = time.perf_counter()
    tp = Engine(target, draft, warmup=False, devices=DEVICES, **kw)
    result["mesh"] = generate_all(tp)
    result["mesh_s"] = time.perf_counter() - start
    before = tp.compile_count()
    again = generate_all(tp)
    result["mesh_again_identical"] = again == result["mesh"]
    result["retraced"] = tp.compile_count() - before
    result["shard_shapes"] = shard_shapes(tp)
    result["cache_spec"] = str(tp.target._caches[0][0].sharding.spec)
    del tp
    result["pallas_max_err"] = pallas_per_shard()
    result["pallas_engine_max_err"] = pallas_engine_step(target)
    result["errors"] = bad_inputs(target)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
