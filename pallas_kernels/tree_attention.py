"""Tree attention over a flat token batch: Pallas kernels and the plain-jnp reference.

One call attends every token of a flat batch (prefill chunks, speculation trees and single decode
tokens of many requests, DESIGN.md §2) to
  * the committed cache rows `[0, ctx_len[t])` of its request's slot `slot[t]`, and
  * the new keys/values of this step's tokens `u` with `tree_mask[t, u]`,
with one softmax over the union (scale `1/sqrt(D)`, f32 accumulation). Shapes:

    q                 f32[T, H, D]      queries, RoPE applied; H = KVH * G, head h reads kv h // G
    k_cache, v_cache  f32[S, L, KVH, D] committed K/V, one slot per request
    k_new, v_new      f32[T, KVH, D]    this step's K/V of the T tokens
    slot              i32[T]            cache slot of each token, -1 = padding token
    ctx_len           i32[T]            0 <= ctx_len <= attended_len <= L
    tree_mask         bool[T, T]        tree_mask[t, t] is True for every t (padding too)
    attended_len      static int        only cache rows [0, attended_len) are ever read
    returns           f32[T, H, D]      padding tokens' rows are finite (they attend to themselves)

Tokens may come in any order: every implementation sorts them by slot and works on (block, slot)
*items* (`tree_attention_plan.py`), so a slot's cache is read once per item rather than once per
token and each item is a dense `[block_q * G, D]` query tile.

* `tree_attention_reference` - plain jnp, the production path under XLA on CPU: a `lax.scan`
  over items, each an online softmax over chunks of its slot's rows up to its longest context,
  then the new-token block as one [T, T] einsum.
* `tree_attention` - Pallas, online softmax over the visible new tokens and then over blocks of
  cache rows (the XLA wrapper sorts the small per-token operands; the cache is read in place).
  Two variants:
  - `backend="tpu"` (Mosaic): grid (item, cache block); the item tables are scalar-prefetched
    and drive the cache BlockSpec, paged-attention style. Blocks past an item's longest context
    repeat the previous block index, so they are neither fetched nor computed.
  - `backend="gpu"` (Triton): grid (query block, kv head); each program loops over its block's
    items and their cache blocks, loading rows straight from the cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tree_attention_plan import (
    MASK_VALUE,
    ItemPlan,
    check_shapes,
    next_pow2,
    num_items,
    pick_block_k,
    plan_items,
    sorted_operands,
    unsort_output,
)

_F32 = jnp.float32
# XLA path: the committed part is one batched gather + einsum (`_committed_part_dense`) when the
# items' gathered cache rows W * A are at most DENSE_MAX_ROWS, or DENSE_MAX_ROWS_SINGLE when each
# item holds one query token (decode steps); otherwise the scan (`_committed_part`). Fitted on the
# 2-core dev CPU (6 layers, KVH 2, G 3, D 64): dense is 3-4x faster for a decode step of 8 slots
# at A = 256-512 and 1.4x for S = 32 at A = 1024; the scan wins for T >= 128 with long contexts.
DENSE_MAX_ROWS = 8192
DENSE_MAX_ROWS_SINGLE = 32768
_HIGHEST = lax.Precision.HIGHEST
BACKENDS = ("tpu", "gpu")
# jax.export refuses this custom call unless told otherwise (Triton IR has no stability
# guarantee): export the GPU variant with
# `disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]`.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def xla_block_q(num_tokens: int, num_slots: int, group: int) -> int:
    """Query tokens per item for the XLA path, from a cost model fitted on the 2-core dev CPU.

    An item of `M = block_q * G` query rows costs about `60 + M + M**2 / 64` row-units per cache
    chunk: a fixed loop / copy overhead, then GEMM work whose per-row cost grows once M passes
    ~64 (measured for T in {16, 32, 64, 256}, S in {8, 32}, KVH=2, G=3, D=64). More items mean
    more overhead, bigger ones more wasted rows; take the cheapest power of two.
    """

    def cost(bq: int) -> float:
        m = bq * group
        return num_items(num_tokens, num_slots, bq) * (60 + m + m * m / 64)

    candidates = [1 << i for i in range(next_pow2(num_tokens).bit_length())]
    return min(candidates, key=lambda bq: (cost(bq), bq))


def _committed_part_dense(q_items, row_ctx, plan: ItemPlan, k_cache, v_cache, a: int):
    """`_committed_part` as one batched gather + einsum over all items: no loop overhead,
    which wins when the gathered [W, A, KVH, D] rows are few (decode steps, small trees)."""
    k = k_cache[plan.item_slot, :a]  # [W, A, K, D]
    v = v_cache[plan.item_slot, :a]
    scores = jnp.einsum("WKMD,WAKD->WKMA", q_items, k, preferred_element_type=_F32)
    visible = (jnp.arange(a)[None, None, :] < row_ctx[:, :, None])[:, None]  # [W, 1, M, A]
    scores = jnp.where(visible, scores, MASK_VALUE)
    m = scores.max(-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(scores - m), 0.0)
    o = jnp.einsum("WKMA,WAKD->WKMD", p, v, preferred_element_type=_F32)
    return m, p.sum(-1, keepdims=True), o


def _committed_part(q_items, row_ctx, plan: ItemPlan, k_cache, v_cache, a: int, chunk: int):
    """Online softmax per item over chunks of its slot's rows, only up to its longest context.

    q_items [W, K, M, D], row_ctx i32[W, M] -> (max, sum) f32[W, K, M, 1] and values [W, K, M, D].
    A `lax.scan` over items with a `fori_loop` over chunks beats one batched gather + einsum on
    XLA CPU by 2-5x: no [W, A, KVH, D] copy, rows past an item's context are never touched, and
    unused items cost nothing.
    """
    _, kvh, m_rows, d = q_items.shape
    c = min(chunk, a)

    def item_fn(_, xs):
        q_w, ctx_w, slot_w, ctx_max = xs

        def chunk_fn(j, state):
            start = jnp.minimum(j * c, a - c)  # the last chunk may overlap the previous one
            k = lax.dynamic_slice(k_cache, (slot_w, start, 0, 0), (1, c, kvh, d))[0]  # [C, K, D]
            v = lax.dynamic_slice(v_cache, (slot_w, start, 0, 0), (1, c, kvh, d))[0]
            pos = start + jnp.arange(c)
            visible = (pos >= j * c)[None, :] & (pos[None, :] < ctx_w[:, None])  # [M, C]
            scores = jnp.einsum("KMD,CKD->KMC", q_w, k, preferred_element_type=_F32)
            scores = jnp.where(visible, scores, MASK_VALUE)
            m, denom, acc = state
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(visible, jnp.exp(scores - m_new), 0.0)
            pv = jnp.einsum("KMC,CKD->KMD", p, v, preferred_element_type=_F32)
            return m_new, alpha * denom + p.sum(-1, keepdims=True), alpha * acc + pv

        init = (
            jnp.full((kvh, m_rows, 1), MASK_VALUE, _F32),
            jnp.zeros((kvh, m_rows, 1), _F32),
            jnp.zeros((kvh, m_rows, d), _F32),
        )
        return None, lax.fori_loop(0, -(-ctx_max // c), chunk_fn, init)

    _, out = lax.scan(item_fn, None, (q_items, row_ctx, plan.item_slot, plan.item_ctx))
    return out


def tree_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot: jax.Array,
    ctx_len: jax.Array,
    tree_mask: jax.Array,
    *,
    attended_len: int,
    block_q: int | None = None,
    chunk: int = 256,
    dense_rows: int | None = None,
) -> jax.Array:
    """Tree attention in plain jnp (the XLA path on CPU); contract in the module docstring.

    `block_q` (query tokens per item; None picks `xla_block_q`), `chunk` (cache rows per loop
    step) and `dense_rows` (largest W * A computed without the loop; None = the fitted default)
    only change speed.
    """
    check_shapes(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, attended_len)
    t, h, d = q.shape
    s, _, kvh, _ = k_cache.shape
    g, a = h // kvh, attended_len
    bq = block_q or xla_block_q(t, s, g)
    if dense_rows is None:
        dense_rows = DENSE_MAX_ROWS_SINGLE if bq == 1 else DENSE_MAX_ROWS
    plan = plan_items(slot, ctx_len, s, bq)
    w = plan.item_blk.shape[0]
    qg = (q.astype(_F32) * (1.0 / math.sqrt(d))).reshape(t, kvh, g, d)  # [T, K, G, D]

    # Committed part, one dense tile per item: rows of block item_blk[w] vs slot item_slot[w].
    q_sorted = jnp.pad(qg, ((0, plan.perm.shape[0] - t), (0, 0), (0, 0), (0, 0)))[plan.perm]
    q_items = q_sorted.reshape(-1, bq, kvh, g, d)[plan.item_blk]  # [W, Q, K, G, D]
    q_items = q_items.transpose(0, 2, 1, 3, 4).reshape(w, kvh, bq * g, d)  # [W, K, M, D]
    rows = plan.item_blk[:, None] * bq + jnp.arange(bq)[None, :]  # [W, Q] sorted positions
    row_ctx = jnp.where(plan.row_item[rows] == jnp.arange(w)[:, None], plan.row_ctx[rows], 0)
    row_ctx = jnp.repeat(row_ctx, g, axis=1)
    if w * a <= dense_rows:
        m_c, l_c, o_c = _committed_part_dense(q_items, row_ctx, plan, k_cache, v_cache, a)
    else:
        m_c, l_c, o_c = _committed_part(q_items, row_ctx, plan, k_cache, v_cache, a, chunk)
    m_c, l_c, o_c = (x.reshape(w, kvh, bq, g, -1) for x in (m_c, l_c, o_c))
    item, row = plan.item_of_pos[plan.inv], plan.inv % bq  # each token's own item and row
    m_c, l_c, o_c = (
        m_c[item, :, row, :, 0],
        l_c[item, :, row, :, 0],
        o_c[item, :, row],
    )  # [T, K, G(, D)]
    # A row that sees no cache row has m_c = MASK_VALUE: its weight exp(m_c - m) below is 0.

    # New-token part: a [T, T] block under the tree mask (never empty: tree_mask[t, t]).
    s_new = jnp.einsum("TKGD,UKD->TKGU", qg, k_new.astype(_F32), preferred_element_type=_F32)
    s_new = jnp.where(tree_mask[:, None, None, :], s_new, MASK_VALUE)
    m_n = s_new.max(-1)
    p_n = jnp.exp(s_new - m_n[..., None])
    l_n = p_n.sum(-1)
    o_n = jnp.einsum("TKGU,UKD->TKGD", p_n, v_new.astype(_F32), preferred_element_type=_F32)

    m = jnp.maximum(m_c, m_n)
    a_c, a_n = jnp.exp(m_c - m), jnp.exp(m_n - m)
    out = (o_c * a_c[..., None] + o_n * a_n[..., None]) / (l_c * a_c + l_n * a_n)[..., None]
    return out.reshape(t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- Pallas kernels


def _dot_nt(x: jax.Array, y: jax.Array) -> jax.Array:
    """[M, D] x [N, D] -> f32[M, N]."""
    return lax.dot_general(
        x, y, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=_F32
    )


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
    """[M, N] x [N, D] -> f32[M, D]."""
    return lax.dot_general(
        x, y, (((1,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=_F32
    )


def _online_update(m, denom, acc, s, v, visible):
    """Fold visible scores s[M, N] with values v[N, D] into the running (max, sum, values).

    Masked entries get probability exactly 0, so a row stays (MASK_VALUE, 0, 0) until it sees a
    key; `m` starts at MASK_VALUE or at a real maximum.
    """
    s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    return m_new, alpha * denom + p.sum(axis=-1, keepdims=True), alpha * acc + _dot(p, v)


def _new_token_block(q, k, v, visible):
    """Softmax state (max, sum, weighted values) of queries q[M, D] over the visible new tokens."""
    s = jnp.where(visible, _dot_nt(q, k), MASK_VALUE)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    return m, p.sum(axis=-1, keepdims=True), _dot(p, v)


def _tpu_kernel(
    # scalar prefetch, i32[W] each
    blk_ref, fetch_slot_ref, fetch_blk_ref, nblk_ref, first_ref, last_ref,
    # inputs
    q_ref,  # [KVH, M, D] pre-scaled queries of the item's block, M = block_q * G
    kn_ref, vn_ref,  # [KVH, Tp, D] new K/V, sorted token order
    tmask_ref,  # i32[M, Tp] tree mask rows of the block
    row_item_ref, row_ctx_ref,  # i32[M, 1]
    k_ref, v_ref,  # [block_k * KVH, D] cache rows of the item's slot, kv heads interleaved
    # output and scratch
    o_ref,  # [KVH, M, D]
    m_ref, l_ref,  # f32[KVH, M, 1]
    acc_ref,  # f32[KVH, M, D]
    *, num_kv_heads: int, block_k: int, num_k_blocks: int,
):  # fmt: skip
    w, j = pl.program_id(0), pl.program_id(1)

    @pl.when((first_ref[w] == 1) & (j == 0))
    def _init():  # the item opens its query block: start from the new-token block
        visible = tmask_ref[...] != 0
        for h in range(num_kv_heads):
            m_ref[h], l_ref[h], acc_ref[h] = _new_token_block(
                q_ref[h], kn_ref[h], vn_ref[h], visible
            )

    @pl.when(j < nblk_ref[w])
    def _cache_block():
        col = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = (row_item_ref[...] == w) & (col < row_ctx_ref[...])  # [M, block_k]
        for h in range(num_kv_heads):  # sublane-strided loads pick kv head h's rows
            s = _dot_nt(q_ref[h], k_ref[h::num_kv_heads, :])
            v = v_ref[h::num_kv_heads, :]
            state = (m_ref[h], l_ref[h], acc_ref[h])
            m_ref[h], l_ref[h], acc_ref[h] = _online_update(*state, s, v, visible)

    @pl.when((last_ref[w] == 1) & (j == num_k_blocks - 1))
    def _finish():
        for h in range(num_kv_heads):
            o_ref[h] = (acc_ref[h] / l_ref[h]).astype(o_ref.dtype)


def _triton_kernel(
    item_start_ref, item_stop_ref,  # i32[nb] items of each query block
    col_start_ref, col_stop_ref,  # i32[nb] new-token column blocks the query block can see
    item_slot_ref, item_nblk_ref,  # i32[W]
    q_ref,  # [M, D] pre-scaled queries of (block, kv head), M = block_q * Gp
    kn_ref, vn_ref,  # [KVH, Tp, D] new K/V, sorted token order
    tmask_ref,  # i32[M, Tp] tree mask rows of the block
    row_item_ref, row_ctx_ref,  # i32[M]
    k_ref, v_ref,  # [S, L, KVH * D] whole caches
    o_ref,  # [M, D]
    *, head_dim: int, block_k: int, block_n: int,
):  # fmt: skip
    b, h = pl.program_id(0), pl.program_id(1)
    q = q_ref[...]
    m_rows = q.shape[0]
    row_item, row_ctx = row_item_ref[...], row_ctx_ref[...]
    carry = (
        jnp.full((m_rows, 1), MASK_VALUE, _F32),
        jnp.zeros((m_rows, 1), _F32),
        jnp.zeros((m_rows, head_dim), _F32),
    )

    def new_block(c, carry):  # new tokens [c * block_n, (c + 1) * block_n) of the same requests
        cols = pl.ds(pl.multiple_of(c * block_n, block_n), block_n)
        visible = tmask_ref[:, cols] != 0
        s = _dot_nt(q, kn_ref[h, cols, :])
        return _online_update(*carry, s, vn_ref[h, cols, :], visible)

    carry = lax.fori_loop(col_start_ref[b], col_stop_ref[b], new_block, carry)
    lanes = pl.ds(pl.multiple_of(h * head_dim, head_dim), head_dim)

    def item_body(w, carry):
        slot, mine = item_slot_ref[w], (row_item == w)[:, None]

        def cache_block(j, carry):
            rows = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
            col = j * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]
            visible = mine & (col < row_ctx[:, None])
            s = _dot_nt(q, k_ref[slot, rows, lanes])
            return _online_update(*carry, s, v_ref[slot, rows, lanes], visible)

        return lax.fori_loop(0, item_nblk_ref[w], cache_block, carry)

    _, denom, acc = lax.fori_loop(item_start_ref[b], item_stop_ref[b], item_body, carry)
    o_ref[...] = (acc / denom).astype(o_ref.dtype)


def _tpu_call(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, *,
              attended_len, block_q, block_k, interpret):  # fmt: skip
    t, h, d = q.shape
    s, length, kvh, _ = k_cache.shape
    g = h // kvh
    bq = block_q or min(16, max(8, next_pow2(t)))
    if bq % 8:
        raise ValueError(f"{block_q=} must be a multiple of 8 on TPU")
    bk = pick_block_k(attended_len, block_k or 128, length, gpu=False)
    nkb = attended_len // bk
    plan = plan_items(slot, ctx_len, s, bq)
    tp, w, m_rows = plan.perm.shape[0], plan.item_blk.shape[0], bq * g
    q_rows, kn, vn, mask_rows, row_item, row_ctx = sorted_operands(
        q, k_new, v_new, tree_mask, plan, g
    )
    # Item tables. An item that reads no cache keeps the previous item's cache block index, so
    # the pipeline neither refetches nor computes anything for it.
    nblk = -(-plan.item_ctx // bk)
    ids = jnp.arange(w, dtype=jnp.int32)
    src = lax.cummax(jnp.where(nblk > 0, ids, -1), axis=0)
    fetch_slot = jnp.where(src >= 0, plan.item_slot[jnp.maximum(src, 0)], 0)
    fetch_blk = jnp.where(src >= 0, nblk[jnp.maximum(src, 0)] - 1, 0)
    blk = plan.item_blk
    first = jnp.concatenate([jnp.ones((1,), bool), blk[1:] != blk[:-1]]).astype(jnp.int32)
    last = jnp.concatenate([blk[1:] != blk[:-1], jnp.ones((1,), bool)]).astype(jnp.int32)

    def cache_map(wi, j, blk_r, fslot_r, fblk_r, nblk_r, first_r, last_r):
        j_fetch = jnp.where(nblk_r[wi] > 0, jnp.minimum(j, fblk_r[wi]), fblk_r[wi])
        return fslot_r[wi], j_fetch, 0

    def block_map(wi, j, blk_r, *_):
        return 0, blk_r[wi], 0

    def rows_map(wi, j, blk_r, *_):
        return blk_r[wi], 0

    def whole_map(wi, j, *_):
        return 0, 0, 0

    kernel = functools.partial(_tpu_kernel, num_kv_heads=kvh, block_k=bk, num_k_blocks=nkb)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(w, nkb),
            in_specs=[
                pl.BlockSpec((kvh, m_rows, d), block_map),
                pl.BlockSpec((kvh, tp, d), whole_map),
                pl.BlockSpec((kvh, tp, d), whole_map),
                pl.BlockSpec((m_rows, tp), rows_map),
                pl.BlockSpec((m_rows, 1), rows_map),
                pl.BlockSpec((m_rows, 1), rows_map),
                pl.BlockSpec((None, bk * kvh, d), cache_map),
                pl.BlockSpec((None, bk * kvh, d), cache_map),
            ],
            out_specs=pl.BlockSpec((kvh, m_rows, d), block_map),
            scratch_shapes=[
                pltpu.VMEM((kvh, m_rows, 1), _F32),
                pltpu.VMEM((kvh, m_rows, 1), _F32),
                pltpu.VMEM((kvh, m_rows, d), _F32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((kvh, tp * g, d), _F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
        name="tree_attention_tpu",
    )(
        blk, fetch_slot, fetch_blk, nblk, first, last,
        q_rows, kn, vn, mask_rows, row_item[:, None], row_ctx[:, None],
        k_cache.reshape(s, length * kvh, d), v_cache.reshape(s, length * kvh, d),
    )  # fmt: skip
    return unsort_output(out, plan, t, g)


def _gpu_call(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, *,
              attended_len, block_q, block_k, num_warps, num_stages, interpret):  # fmt: skip
    t, h, d = q.shape
    s, length, kvh, _ = k_cache.shape
    g = h // kvh
    gp = next_pow2(g)
    if d != next_pow2(d) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the Triton kernel")
    bq = block_q or max(1, 32 // gp)  # 32 query rows per program
    if bq != next_pow2(bq) or bq * gp < 16:
        raise ValueError(f"{block_q=} must be a power of two with block_q * {gp} >= 16")
    bk = pick_block_k(attended_len, block_k or 64, length, gpu=True)
    tp = max(next_pow2(t), bq, 16)  # Triton tensors (and tl.dot) need powers of two >= 16
    plan = plan_items(slot, ctx_len, s, bq, padded_len=tp)
    nb, m_rows = tp // bq, bq * gp
    q_rows, kn, vn, mask_rows, row_item, row_ctx = sorted_operands(
        q, k_new, v_new, tree_mask, plan, gp
    )
    blocks = jnp.arange(nb, dtype=jnp.int32)
    n_used = plan.item_of_pos[-1] + 1  # trailing items are unused
    item_start = jnp.searchsorted(plan.item_blk, blocks, side="left").astype(jnp.int32)
    item_stop = jnp.minimum(jnp.searchsorted(plan.item_blk, blocks, side="right"), n_used)
    item_nblk = -(-plan.item_ctx // bk)
    # New-token columns a block can see: the sorted runs of its requests (a padding row: itself).
    pos = jnp.arange(tp, dtype=jnp.int32)
    key = jnp.where(plan.row_slot >= 0, plan.row_slot, -1 - pos)
    boundary = key[1:] != key[:-1]
    is_start = jnp.concatenate([jnp.ones((1,), bool), boundary])
    is_end = jnp.concatenate([boundary, jnp.ones((1,), bool)])
    run_start = lax.cummax(jnp.where(is_start, pos, 0), axis=0)
    run_stop = lax.cummin(jnp.where(is_end, pos + 1, tp), axis=0, reverse=True)
    bn = min(tp, 64)
    col_start = run_start[blocks * bq] // bn
    col_stop = -(-run_stop[blocks * bq + bq - 1] // bn)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_triton_kernel, head_dim=d, block_k=bk, block_n=bn)
    out = pl.pallas_call(
        kernel,
        grid=(nb, kvh),
        in_specs=[
            *[whole] * 6,
            pl.BlockSpec((None, m_rows, d), lambda b, hh: (hh, b, 0)),
            whole,
            whole,
            pl.BlockSpec((m_rows, tp), lambda b, hh: (b, 0)),
            pl.BlockSpec((m_rows,), lambda b, hh: (b,)),
            pl.BlockSpec((m_rows,), lambda b, hh: (b,)),
            whole,
            whole,
        ],
        out_specs=pl.BlockSpec((None, m_rows, d), lambda b, hh: (hh, b, 0)),
        out_shape=jax.ShapeDtypeStruct((kvh, tp * gp, d), _F32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="tree_attention_triton",
    )(
        item_start, item_stop.astype(jnp.int32), col_start, col_stop, plan.item_slot, item_nblk,
        q_rows, kn, vn, mask_rows, row_item, row_ctx,
        k_cache.reshape(s, length, kvh * d), v_cache.reshape(s, length, kvh * d),
    )  # fmt: skip
    return unsort_output(out, plan, t, g)


def tree_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot: jax.Array,
    ctx_len: jax.Array,
    tree_mask: jax.Array,
    *,
    attended_len: int,
    interpret: bool | pltpu.InterpretParams = False,
    backend: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Tree attention as a Pallas kernel; same contract and result as `tree_attention_reference`.

    `backend`: "tpu" (Mosaic) or "gpu" (Triton); None follows `jax.default_backend()` (the TPU
    variant when that is neither, e.g. interpret mode on CPU). Block sizes:
      * `block_q` tokens per query block: TPU a multiple of 8 (default 8-16); GPU a power of two
        with `block_q * next_pow2(G) >= 16` (default 32 rows per program).
      * `block_k` cache rows per step (TPU default 128, GPU 64), shrunk to a power-of-two
        fraction dividing `attended_len` (TPU: a multiple of 8; GPU: >= 16).
    GPU also needs D a power of two >= 16. `num_warps` / `num_stages` are Triton's.
    `interpret=True` runs either variant on CPU; `pltpu.InterpretParams()` runs the TPU variant
    in Pallas's TPU-faithful interpreter (simulated DMAs and block pipelining).

    Numerics differ from the reference only by f32 summation order (matmuls use
    `Precision.HIGHEST`: no bf16/TF32 passes). The GPU variant reads new tokens only within the
    sorted runs of a block's requests, so it ignores `tree_mask` entries across requests, which
    the contract rules out anyway.
    """
    check_shapes(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, attended_len)
    if backend is None:
        backend = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if backend == "gpu" and not isinstance(interpret, bool):
        raise ValueError(f"{interpret=} must be a bool for the Triton kernel")
    args = (q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask)
    common = dict(attended_len=attended_len, block_q=block_q, block_k=block_k, interpret=interpret)
    if backend == "tpu":
        out = _tpu_call(*args, **common)
    else:
        out = _gpu_call(*args, **common, num_warps=num_warps, num_stages=num_stages)
    return out.astype(q.dtype)
