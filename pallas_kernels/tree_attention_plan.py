"""Work plan shared by every tree-attention implementation (see `tree_attention.py`).

Also the kernels' XLA-side operand preparation (sorting tokens, picking block sizes).

Tokens are stably sorted by slot (padding last) and cut into blocks of `block_q` consecutive
sorted tokens. An *item* is one (block, slot) pair: the rows of a block that belong to one
request, attending to that request's cache rows. A sorted slot forms a single run, so a batch
of `R` distinct requests in `nb` blocks has at most `nb + R - 1` items: a static bound that holds
for any token order. The engine's grouped layout just makes the sort the identity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32

# Finite "minus infinity": masked scores stay finite, so fully masked rows never produce NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def num_items(num_tokens: int, num_slots: int, block_q: int) -> int:
    """Static bound on the (block, slot) items of a batch: `nb + min(S, T) - 1`, at most `Tp`."""
    nb = -(-num_tokens // block_q)
    return min(nb + min(num_slots, num_tokens) - 1, nb * block_q)


class ItemPlan(NamedTuple):
    """Which token goes where (all int32; Tp = padded token count, W items).

    Sorted position p holds token `perm[p]` (ids >= T are padding rows that fill Tp).
    Item w covers sorted positions `[item_blk[w]*block_q, (item_blk[w]+1)*block_q)`, of which
    exactly those with `row_item[p] == w` belong to it; they attend to cache slot `item_slot[w]`
    rows `< row_ctx[p]`, and `item_ctx[w]` is their maximum (0: the item reads no cache).
    Items are ordered by block; unused trailing items repeat the last block with `item_ctx = 0`.
    """

    perm: jax.Array  # i32[Tp]
    inv: jax.Array  # i32[T]   sorted position of each token
    row_slot: jax.Array  # i32[Tp]  slot of the row, -1 for padding rows
    row_item: jax.Array  # i32[Tp]  item owning the row, -1 for padding rows
    row_ctx: jax.Array  # i32[Tp]  cache rows the row sees (0 for padding rows)
    item_of_pos: jax.Array  # i32[Tp]  item of each sorted position (padding rows included)
    item_blk: jax.Array  # i32[W]
    item_slot: jax.Array  # i32[W]   in [0, S), meaningful where item_ctx > 0
    item_ctx: jax.Array  # i32[W]


def plan_items(
    slot: jax.Array, ctx_len: jax.Array, num_slots: int, block_q: int, padded_len: int = 0
) -> ItemPlan:
    """Sort tokens by slot and cut them into (block, slot) items (see `ItemPlan`).

    `padded_len` (a multiple of `block_q`, >= T) overrides the default Tp = T rounded up.
    """
    t = slot.shape[0]
    tp = max(padded_len, -(-t // block_q) * block_q)
    if tp % block_q:
        raise ValueError(f"{padded_len=} must be a multiple of {block_q=}")
    nb = tp // block_q
    w = min(nb + min(num_slots, t) - 1, tp)  # == num_items(t, num_slots, block_q) when unpadded
    slot_p = jnp.pad(slot.astype(jnp.int32), (0, tp - t), constant_values=-1)
    ctx_p = jnp.pad(ctx_len.astype(jnp.int32), (0, tp - t))
    real = slot_p >= 0
    perm = jnp.argsort(jnp.where(real, slot_p, num_slots), stable=True).astype(jnp.int32)
    inv = jnp.zeros((tp,), jnp.int32).at[perm].set(jnp.arange(tp, dtype=jnp.int32))[:t]
    s_slot, s_real = slot_p[perm], real[perm]
    s_ctx = jnp.where(s_real, ctx_p[perm], 0)
    pos = jnp.arange(tp, dtype=jnp.int32)
    prev = jnp.pad(s_slot[:-1], (1, 0), constant_values=-1)
    starts = (pos % block_q == 0) | (s_real & (s_slot != prev))
    item_of_pos = jnp.cumsum(starts, dtype=jnp.int32) - 1
    item_blk = jnp.full((w,), nb - 1, jnp.int32).at[item_of_pos].set(pos // block_q, mode="drop")
    item_slot = jnp.zeros((w,), jnp.int32).at[item_of_pos].max(s_slot, mode="drop")
    item_ctx = jnp.zeros((w,), jnp.int32).at[item_of_pos].max(s_ctx, mode="drop")
    row_item = jnp.where(s_real, item_of_pos, -1)
    return ItemPlan(perm, inv, s_slot, row_item, s_ctx, item_of_pos, item_blk, item_slot, item_ctx)


def check_shapes(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, attended_len):
    """Raise ValueError unless the arguments follow the tree-attention shape contract."""
    t, h, d = q.shape
    _, length, kvh, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d:
        raise ValueError(f"{k_cache.shape=} {v_cache.shape=} must be [S, L, KVH, {d}]")
    if k_new.shape != (t, kvh, d) or v_new.shape != (t, kvh, d):
        raise ValueError(f"{k_new.shape=} {v_new.shape=} must be {(t, kvh, d)}")
    if h % kvh:
        raise ValueError(f"num heads {h} must be a multiple of num kv heads {kvh}")
    if slot.shape != (t,) or ctx_len.shape != (t,) or tree_mask.shape != (t, t):
        raise ValueError(
            f"{slot.shape=} {ctx_len.shape=} {tree_mask.shape=} must be [T], [T], [T, T]"
        )
    if not 0 < attended_len <= length:
        raise ValueError(f"{attended_len=} must be in (0, L={length}]")


def pick_block_k(attended_len: int, requested: int, length: int, *, gpu: bool) -> int:
    """Cache rows per step: the largest halving of `requested` that divides `attended_len`.

    TPU needs a multiple of 8 (or all L rows); Triton a power of two >= 16.
    """
    multiple = 16 if gpu else 8
    bk = min(requested, attended_len)
    if gpu:
        bk = next_pow2(bk + 1) // 2  # largest power of two <= bk
    while bk >= multiple:
        if attended_len % bk == 0 and bk % multiple == 0:
            return bk
        bk //= 2
    if not gpu and attended_len == length:
        return attended_len
    raise ValueError(
        f"{attended_len=} has no {'power-of-two ' if gpu else ''}cache block size that is a "
        f"multiple of {multiple} and divides it"
    )


def sorted_operands(q, k_new, v_new, tree_mask, plan: ItemPlan, group_pad: int):
    """Permute the small per-token operands into sorted order, kv-head major.

    Returns q [KVH, Tp * Gp, D] (scaled; padded heads are zero), k_new/v_new [KVH, Tp, D],
    tree mask rows i32[Tp * Gp, Tp] and per-row item / ctx i32[Tp * Gp].
    """
    t, h, d = q.shape
    kvh = k_new.shape[1]
    g = h // kvh
    tp = plan.perm.shape[0]
    pad_t = ((0, tp - t), (0, 0), (0, 0))
    qg = jnp.pad((q.astype(_F32) * (1.0 / math.sqrt(d))), pad_t)[plan.perm]
    qg = jnp.pad(qg.reshape(tp, kvh, g, d), ((0, 0), (0, 0), (0, group_pad - g), (0, 0)))
    q_rows = qg.transpose(1, 0, 2, 3).reshape(kvh, tp * group_pad, d)  # [KVH, Tp*Gp, D]
    kn = jnp.pad(k_new.astype(_F32), pad_t)[plan.perm].transpose(1, 0, 2)  # [KVH, Tp, D]
    vn = jnp.pad(v_new.astype(_F32), pad_t)[plan.perm].transpose(1, 0, 2)
    mask = jnp.pad(tree_mask, ((0, tp - t), (0, tp - t))) | jnp.eye(tp, dtype=bool)
    mask = mask[plan.perm][:, plan.perm].astype(jnp.int32)
    mask_rows = jnp.repeat(mask, group_pad, axis=0)  # [Tp*Gp, Tp]
    row_item = jnp.repeat(plan.row_item, group_pad)
    row_ctx = jnp.repeat(plan.row_ctx, group_pad)
    return q_rows, kn, vn, mask_rows, row_item, row_ctx


def unsort_output(o_rows: jax.Array, plan: ItemPlan, t: int, group: int) -> jax.Array:
    """[KVH, Tp * Gp, D] kernel output -> [T, H, D] in the caller's token order."""
    kvh, rows, d = o_rows.shape
    tp = plan.perm.shape[0]
    o = o_rows.reshape(kvh, tp, rows // tp, d)[:, plan.inv, :group]  # [KVH, T, G, D]
    return o.transpose(1, 0, 2, 3).reshape(t, kvh * group, d)
