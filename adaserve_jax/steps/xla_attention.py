"""Temporary XLA tree attention until pallas_kernels.tree_attention lands (same contract)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_attention_xla(
    q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, *, attended_len
):
    t, h, d = q.shape
    s_count, _, kvh, _ = k_cache.shape
    g = h // kvh
    qg = q.reshape(t, kvh, g, d) / jnp.sqrt(jnp.float32(d))  # [T, K, G, D]
    slot_c = jnp.clip(slot, 0, s_count - 1)
    kc = jnp.take(k_cache[:, :attended_len], slot_c, axis=0)  # [T, L, K, D]
    vc = jnp.take(v_cache[:, :attended_len], slot_c, axis=0)
    s_ctx = jnp.einsum("TKGD,TLKD->TKGL", qg, kc)
    ctx_ok = jnp.arange(attended_len)[None, :] < ctx_len[:, None]  # [T, L]
    s_ctx = jnp.where(ctx_ok[:, None, None, :], s_ctx, -jnp.inf)
    s_new = jnp.einsum("TKGD,UKD->TKGU", qg, k_new)
    s_new = jnp.where(tree_mask[:, None, None, :], s_new, -jnp.inf)
    scores = jnp.concatenate([s_ctx, s_new], axis=-1).astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("TKGL,TLKD->TKGD", probs[..., :attended_len], vc) + jnp.einsum(
        "TKGU,UKD->TKGD", probs[..., attended_len:], v_new
    )
    return out.reshape(t, h, d)
