"""The flat-token step: one jit-compiled forward over T tokens from any mix of requests.

Inputs (all padded to a token bucket T; padding tokens have slot -1):
    tokens i32[T], slot i32[T], position i32[T], cache_index i32[T], ctx_len i32[T],
    tree_mask bool[T,T]                                   (see engine/batch.py)
    move_slot/move_src/move_dst i32[M]                    KV compaction, applied first
    temperature f32[T], top_k i32[T], top_p f32[T], seed u32[T]   (sampling head only)
Static: the head ("sample" | "logits" | "topk" | "topk_last"), attended_len (a context bucket).
"topk_last" computes the logits only at each slot's last token of the batch and returns
top-k (log-probs f32[S,k], tokens i32[S,k]) per slot (zeros for slots not in the batch):
what the draft needs from its catch-up step, without the LM head over every token.

KV caches are a per-layer list of (k, v) f32[S, L, KVH, D] and are donated: the
step writes this batch's K/V rows in place and returns the new caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import Transformer
from adaserve_jax.steps.sampling import sample_tokens

Caches = list[tuple[jax.Array, jax.Array]]
HEADS = ("sample", "logits", "topk", "topk_last")


def init_caches(cfg: ModelConfig, num_slots: int, max_len: int) -> Caches:
    """Zeroed KV caches: per layer (k, v) f32[S, L, KVH, D]."""
    shape = (num_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [
        (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        for _ in range(cfg.num_layers)
    ]


def _compact(cache: jax.Array, move_slot, move_src, move_dst) -> jax.Array:
    """Copy rows (slot, src) -> (slot, dst) for every move; padding moves have slot == S."""
    s_count = cache.shape[0]
    rows = cache[jnp.clip(move_slot, 0, s_count - 1), move_src]  # [M, KVH, D], read before writing
    return cache.at[move_slot, move_dst].set(rows, mode="drop")


def build_step(cfg: ModelConfig, attention: Callable, topk: int = 8) -> Callable:
    """Returns step(params, caches, batch: dict, *, head, attended_len) -> (out, caches), jitted."""
    model = Transformer(cfg)

    @functools.partial(jax.jit, static_argnames=("head", "attended_len"), donate_argnums=(1,))
    def step(params: Any, caches: Caches, batch: dict, *, head: str, attended_len: int):
        s_count = caches[0][0].shape[0]
        slot = batch["slot"]
        write_slot = jnp.where(slot < 0, s_count, slot)  # padding rows are dropped
        move_slot = jnp.where(batch["move_slot"] < 0, s_count, batch["move_slot"])

        def attention_fn(layer, q, k, v, cache):
            del layer
            kc, vc = cache
            kc = _compact(kc, move_slot, batch["move_src"], batch["move_dst"])
            vc = _compact(vc, move_slot, batch["move_src"], batch["move_dst"])
            kc = kc.at[write_slot, batch["cache_index"]].set(k[0], mode="drop")
            vc = vc.at[write_slot, batch["cache_index"]].set(v[0], mode="drop")
            out = attention(
                q[0],
                kc,
                vc,
                k[0],
                v[0],
                slot,
                batch["ctx_len"],
                batch["tree_mask"],
                attended_len=attended_len,
            )
            return out[None], (kc, vc)

        logits_at = None
        if head == "topk_last":  # each slot's last (highest-index) token in the batch
            t = slot.shape[0]
            last = (
                jnp.full((s_count,), -1, jnp.int32)
                .at[write_slot]
                .max(jnp.arange(t, dtype=jnp.int32), mode="drop")
            )
            logits_at = jnp.maximum(last, 0)[None]
        logits, caches = model.apply(
            {"params": params},
            batch["tokens"][None],
            batch["position"][None],
            attention_fn,
            caches,
            logits_at,
        )
        logits = logits[0]  # [T, V] ([S, V] for topk_last)
        if head == "logits":
            out = logits
        elif head == "sample":
            out = sample_tokens(
                logits,
                batch["position"],
                batch["temperature"],
                batch["top_k"],
                batch["top_p"],
                batch["seed"],
            )
        elif head in ("topk", "topk_last"):
            vals, idx = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)
            if head == "topk_last":
                present = (last >= 0)[:, None]
                vals, idx = jnp.where(present, vals, 0.0), jnp.where(present, idx, 0)
            out = (vals, idx.astype(jnp.int32))
        else:
            raise ValueError(f"{head=} must be one of {HEADS}")
        return out, caches

    return step
