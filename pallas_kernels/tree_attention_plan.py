"""Work plan shared by every tree-attention implementation (see `tree_attention.py`).

Tokens are stably sorted by slot (padding last) and cut into blocks of `block_q` consecutive
sorted tokens. An *item* is one (block, slot) pair: the rows of a block that belong to one
request, attending to that request's cache rows. A sorted slot forms a single run, so a batch
of `R` distinct requests in `nb` blocks has at most `nb + R - 1` items: a static bound that holds
for any token order. The engine's grouped layout just makes the sort the identity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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
