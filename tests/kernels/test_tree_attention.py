"""Tree attention: Pallas kernels (interpret mode) vs the jnp reference vs a per-token numpy loop.

Every case mixes several requests in one flat batch (random trees, chains, single decode tokens,
padding), so one compile covers many situations: compiles dominate this file's runtime, so the
jitted functions are cached per shape and built with XLA's cheapest optimization level.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tree_attention import (
    TRITON_CUSTOM_CALL,
    tree_attention,
    tree_attention_reference,
)
from pallas_kernels.tree_attention_plan import num_items, plan_items

FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------------------------ batches


def ancestor_mask(parents: list[int]) -> np.ndarray:
    """bool[n, n]: node i sees node j iff j is i or an ancestor of i (parents[i] < i, root -1)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def random_parents(rng: np.random.Generator, n: int) -> list[int]:
    return [-1] + [int(rng.integers(0, i)) for i in range(1, n)]


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


@dataclasses.dataclass(frozen=True)
class Request:
    parents: list[int]  # the request's tree of new tokens
    ctx: int  # committed cache rows its tokens see
    ragged: bool = False  # give each token its own ctx in [0, ctx] instead


@dataclasses.dataclass
class Batch:
    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    k_new: np.ndarray
    v_new: np.ndarray
    slot: np.ndarray
    ctx_len: np.ndarray
    tree_mask: np.ndarray
    attended_len: int

    def args(self) -> tuple[np.ndarray, ...]:
        return (self.q, self.k_cache, self.v_cache, self.k_new, self.v_new, self.slot,
                self.ctx_len, self.tree_mask)  # fmt: skip


def make_batch(rng, requests, *, t, kvh, g, d, num_slots, length, attended_len, order="grouped"):
    """Requests get distinct random slots; leftover tokens are padding (slot -1).

    order: "grouped" (each request contiguous, padding last), "padding_between" (padding tokens
    between requests) or "shuffled" (tokens of all requests interleaved at random).
    """
    slots = rng.permutation(num_slots)[: len(requests)]
    slot = np.full(t, -1, np.int32)
    ctx = np.zeros(t, np.int32)
    mask = np.eye(t, dtype=bool)
    groups, pos = [], 0
    for r, req in enumerate(requests):
        n = len(req.parents)
        idx = np.arange(pos, pos + n)
        groups.append(idx)
        slot[idx] = slots[r]
        ctx[idx] = rng.integers(0, req.ctx + 1, n) if req.ragged else req.ctx
        mask[np.ix_(idx, idx)] = ancestor_mask(req.parents)
        pos += n
    assert pos <= t, "requests do not fit the batch"
    perm = np.arange(t)
    if order == "shuffled":
        perm = rng.permutation(t)
    elif order == "padding_between":
        pads = np.array_split(np.arange(pos, t), len(groups) + 1)
        perm = np.concatenate(
            [pads[0]] + [np.r_[gr, pad] for gr, pad in zip(groups, pads[1:], strict=True)]
        )
    slot, ctx, mask = slot[perm], ctx[perm], mask[np.ix_(perm, perm)]
    f32 = np.float32
    return Batch(
        q=rng.standard_normal((t, kvh * g, d)).astype(f32),
        k_cache=rng.standard_normal((num_slots, length, kvh, d)).astype(f32),
        v_cache=rng.standard_normal((num_slots, length, kvh, d)).astype(f32),
        k_new=rng.standard_normal((t, kvh, d)).astype(f32),
        v_new=rng.standard_normal((t, kvh, d)).astype(f32),
        slot=slot,
        ctx_len=ctx,
        tree_mask=mask,
        attended_len=attended_len,
    )


def numpy_tree_attention(b: Batch) -> np.ndarray:
    """Dead-simple float64 loop: per token and head, gather what it sees and softmax."""
    t, h, d = b.q.shape
    g = h // b.k_cache.shape[2]
    out = np.zeros((t, h, d))
    for i in range(t):
        for head in range(h):
            kv = head // g
            keys, values = [], []
            if b.slot[i] >= 0:
                keys.append(b.k_cache[b.slot[i], : b.ctx_len[i], kv])
                values.append(b.v_cache[b.slot[i], : b.ctx_len[i], kv])
            keys.append(b.k_new[b.tree_mask[i], kv])
            values.append(b.v_new[b.tree_mask[i], kv])
            scores = np.concatenate(keys).astype(np.float64) @ b.q[i, head] / np.sqrt(d)
            p = np.exp(scores - scores.max())
            out[i, head] = (p / p.sum()) @ np.concatenate(values)
    return out


def assert_close(got, want, real: np.ndarray, atol: float) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "non-finite output (padding rows included)"
    err = np.abs(got[real] - want[real]).max(initial=0.0)
    assert err <= atol, f"max abs err {err:.2e} > {atol:.0e}"


# -------------------------------------------------------------------------------- jitted calls


@functools.cache
def reference_fn(attended_len: int):
    return jax.jit(
        functools.partial(tree_attention_reference, attended_len=attended_len),
        compiler_options=FAST_COMPILE,
    )


@functools.cache
def kernel_fn(backend: str, attended_len: int, block_q: int | None, block_k: int | None):
    return jax.jit(
        functools.partial(
            tree_attention,
            attended_len=attended_len,
            interpret=True,
            backend=backend,
            block_q=block_q,
            block_k=block_k,
        ),
        compiler_options=FAST_COMPILE,
    )


# ------------------------------------------------------------------------------- the case grid


def _case_mixed(rng):  # G=1, D=64: trees, a chain, decode tokens, ragged ctx incl. 0 and A
    reqs = [
        Request(random_parents(rng, 20), ctx=64),
        Request(chain(12), ctx=0),
        Request([-1], ctx=17),
        Request(random_parents(rng, 9), ctx=33, ragged=True),
        Request([-1], ctx=0),
        Request([-1], ctx=64),
    ]
    shape = dict(t=64, kvh=2, g=1, d=64, num_slots=8, length=96, attended_len=64)
    return make_batch(rng, reqs, **shape, order="padding_between"), {}


def _case_tree64(rng):  # G=2, D=128: one 64-node tree fills the batch
    reqs = [Request(random_parents(rng, 64), ctx=100)]
    shape = dict(t=64, kvh=1, g=2, d=128, num_slots=2, length=128, attended_len=128)
    return make_batch(rng, reqs, **shape), {"block_k": 32}


def _case_decode(rng):  # G=4: a decode batch, one token per request, shuffled slots
    reqs = [Request([-1], ctx=int(c)) for c in [0, 64, 1, 63, 32, 5, 64, 0, 17, 48, 9]]
    shape = dict(t=16, kvh=2, g=4, d=64, num_slots=16, length=64, attended_len=64)
    return make_batch(rng, reqs, **shape, order="shuffled"), {}


def _case_single(rng):  # one token of one request, D=128
    reqs = [Request([-1], ctx=64)]
    shape = dict(t=1, kvh=1, g=1, d=128, num_slots=3, length=80, attended_len=64)
    return make_batch(rng, reqs, **shape), {}


def _case_target_shape(rng):  # the target model's GQA (KVH=2, G=3), prefill chunk + tree + decode
    reqs = [
        Request(chain(16), ctx=48),
        Request(random_parents(rng, 8), ctx=128),
        Request([-1], ctx=3),
        Request([-1], ctx=0),
    ]
    shape = dict(t=32, kvh=2, g=3, d=64, num_slots=8, length=160, attended_len=128)
    return make_batch(rng, reqs, **shape), {"block_k": 32}


def _case_interleaved(rng):  # tokens of 4 requests interleaved: no grouping assumed anywhere
    sizes_ctx = [(7, 32), (5, 0), (9, 31), (6, 32)]
    reqs = [Request(random_parents(rng, n), ctx=c, ragged=True) for n, c in sizes_ctx]
    shape = dict(t=32, kvh=4, g=2, d=64, num_slots=4, length=32, attended_len=32)
    return make_batch(rng, reqs, **shape, order="shuffled"), {"block_q": 8, "block_k": 16}


CASES = {
    "mixed-g1-d64": _case_mixed,
    "tree64-g2-d128": _case_tree64,
    "decode-g4": _case_decode,
    "single-token": _case_single,
    "gqa3-target": _case_target_shape,
    "interleaved-g2": _case_interleaved,
}


@functools.cache
def case(name: str):
    """(batch, kernel block sizes, reference output), computed once per case."""
    batch, blocks = CASES[name](np.random.default_rng(zlib.crc32(name.encode())))
    want = np.asarray(reference_fn(batch.attended_len)(*batch.args()))
    return batch, blocks, want


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_numpy_loop(name):
    batch, _, want = case(name)
    assert_close(want, numpy_tree_attention(batch), batch.slot >= 0, atol=2e-5)


@pytest.mark.parametrize("dense_rows", [0, 10**9], ids=["scan", "dense"])
@pytest.mark.parametrize("name", ["mixed-g1-d64", "gqa3-target", "interleaved-g2"])
def test_reference_committed_paths_agree(name, dense_rows):
    """Both ways of computing the committed part (the chunked scan and the one-shot dense
    gather) give the numpy loop's answer, whichever the default picks for the shape."""
    batch, _, _ = case(name)
    fn = jax.jit(
        functools.partial(
            tree_attention_reference, attended_len=batch.attended_len, dense_rows=dense_rows
        ),
        compiler_options=FAST_COMPILE,
    )
    assert_close(fn(*batch.args()), numpy_tree_attention(batch), batch.slot >= 0, atol=2e-5)


@pytest.mark.parametrize("block_q, chunk", [(1, 16), (32, 40)])
def test_reference_block_sizes_only_change_speed(block_q, chunk):
    """Items of one token or of 32, and a chunk (40) that does not divide attended_len (64):
    the last chunk overlaps the previous one and must not count rows twice."""
    batch, _, want = case("mixed-g1-d64")
    fn = jax.jit(
        functools.partial(tree_attention_reference, attended_len=64, block_q=block_q, chunk=chunk),
        compiler_options=FAST_COMPILE,
    )
    assert_close(fn(*batch.args()), want, batch.slot >= 0, atol=2e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference(name, backend):
    batch, blocks, want = case(name)
    fn = kernel_fn(backend, batch.attended_len, blocks.get("block_q"), blocks.get("block_k"))
    assert_close(fn(*batch.args()), want, batch.slot >= 0, atol=1e-4)


def test_tpu_kernel_in_tpu_interpreter():
    """Pallas's TPU-faithful interpreter simulates the DMAs and the pipeline's block revisits
    (an output block stays resident across the items of its query block)."""
    batch, blocks, want = case("gqa3-target")
    got = tree_attention(
        *batch.args(),
        attended_len=batch.attended_len,
        backend="tpu",
        interpret=pltpu.InterpretParams(),
        block_k=blocks.get("block_k"),
    )
    assert_close(got, want, batch.slot >= 0, atol=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_small_batches(data):
    """Random requests (trees, chains, ragged ctx, any token order) in a fixed small shape."""
    t, num_slots, attended_len = 16, 4, 32
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=num_slots), label="sizes")
    while sum(sizes) > t:
        sizes.pop()
    reqs = [
        Request(
            chain(n) if data.draw(st.booleans(), label="chain") else random_parents(rng, n),
            ctx=data.draw(st.integers(0, attended_len), label="ctx"),
            ragged=data.draw(st.booleans(), label="ragged"),
        )
        for n in sizes
    ]
    order = data.draw(st.sampled_from(["grouped", "padding_between", "shuffled"]), label="order")
    batch = make_batch(rng, reqs, t=t, kvh=2, g=2, d=16, num_slots=num_slots, length=40,
                       attended_len=attended_len, order=order)  # fmt: skip
    real = batch.slot >= 0
    want = np.asarray(reference_fn(attended_len)(*batch.args()))
    assert_close(want, numpy_tree_attention(batch), real, atol=2e-5)
    for backend in ("tpu", "gpu"):
        got = kernel_fn(backend, attended_len, None, 16)(*batch.args())
        assert_close(got, want, real, atol=1e-4)


@functools.cache
def plan_fn(num_slots: int, block_q: int):
    return jax.jit(functools.partial(plan_items, num_slots=num_slots, block_q=block_q))


@settings(max_examples=30, deadline=None)
@given(
    slot=st.lists(st.integers(-1, 5), min_size=24, max_size=24),
    block_q=st.sampled_from([1, 4, 8]),
)
def test_item_plan_covers_every_token_once(slot, block_q):
    """Each real token lands in exactly one item of its own slot, within the static item bound."""
    slot = np.asarray(slot, np.int32)
    t = len(slot)
    ctx = np.arange(t, dtype=np.int32) % 7
    plan = jax.tree.map(np.asarray, plan_fn(6, block_q)(slot, ctx))
    assert len(plan.item_blk) == num_items(t, 6, block_q)
    assert sorted(plan.perm[plan.inv].tolist()) == list(range(t))
    for token in range(t):
        pos = plan.inv[token]
        item = plan.row_item[pos]
        if slot[token] < 0:
            assert item == -1 and plan.row_ctx[pos] == 0
            continue
        assert plan.item_blk[item] == pos // block_q
        assert plan.item_slot[item] == slot[token]
        assert plan.row_ctx[pos] == ctx[token] <= plan.item_ctx[item]


# ---------------------------------------------------------------------------------- lowering


def _shape_structs(t, num_slots, length, kvh, g, d):
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    return (sds((t, kvh * g, d), f32), sds((num_slots, length, kvh, d), f32),
            sds((num_slots, length, kvh, d), f32), sds((t, kvh, d), f32), sds((t, kvh, d), f32),
            sds((t,), jnp.int32), sds((t,), jnp.int32), sds((t, t), jnp.bool_))  # fmt: skip


EXPORT_SHAPES = {  # (T, S, L, KVH, G, D, attended_len)
    "target-T64": (64, 8, 2048, 2, 3, 64, 1024),
    "wide-T256": (256, 32, 2048, 8, 4, 128, 512),
    "decode-T1": (1, 4, 256, 1, 8, 128, 64),
}


@pytest.mark.parametrize("shape", EXPORT_SHAPES)
def test_exports_for_tpu(shape):
    t, s, length, kvh, g, d, attended = EXPORT_SHAPES[shape]
    f = jax.jit(functools.partial(tree_attention, attended_len=attended, backend="tpu"))
    exported = jax.export.export(f, platforms=["tpu"])(*_shape_structs(t, s, length, kvh, g, d))
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("shape", EXPORT_SHAPES)
def test_exports_for_cuda(shape):
    """The Triton kernel lowers for CUDA. jax.export refuses Triton custom calls by default
    (Triton IR has no compatibility guarantee), so exactly that check is disabled."""
    t, s, length, kvh, g, d, attended = EXPORT_SHAPES[shape]
    f = jax.jit(functools.partial(tree_attention, attended_len=attended, backend="gpu"))
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    exported = jax.export.export(f, platforms=["cuda"], disabled_checks=disabled)(
        *_shape_structs(t, s, length, kvh, g, d)
    )
    assert exported.platforms == ("cuda",)
    assert TRITON_CUSTOM_CALL in exported.mlir_module()


def test_rejects_bad_shapes():
    batch, _, _ = case("single-token")
    with pytest.raises(ValueError, match="attended_len"):
        tree_attention_reference(*batch.args(), attended_len=batch.k_cache.shape[1] + 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        tree_attention(*batch.args(), attended_len=64, backend="tpu", block_q=4, interpret=True)
    with pytest.raises(ValueError, match="backend"):
        tree_attention(*batch.args(), attended_len=64, backend="metal")
