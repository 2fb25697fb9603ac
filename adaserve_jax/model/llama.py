"""Pure Flax (linen) modules of a Llama-family decoder.

The attention *mixing* (which keys a query sees, where K/V live) is not decided
here: the decoder computes Q/K/V with RoPE applied and hands them to an
`AttentionFn`. `causal_attention` is the plain full-sequence version used for
training and `Model.logits`; the serving steps (`adaserve_jax.steps`) pass one
that reads and writes the paged KV cache with tree masks.

Parameter names follow Hugging Face's Llama layout so imports are a rename.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaserve_jax.model.config import ModelConfig

KV = tuple[jax.Array, jax.Array]


class AttentionFn(Protocol):
    def __call__(
        self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]:
        """q f32[B,T,H,D], k/v f32[B,T,KVH,D] -> (out f32[B,T,H,D], updated layer cache)."""
        ...


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin f32[..., head_dim] for integer positions (HF 'rotate_half' layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,N,D]; cos/sin [B,T,D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def causal_attention(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any):
    """Full causal self-attention over the sequence (no cache). Shapes as AttentionFn."""
    del layer
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)  # [B, T, K, G, D]
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", q, k) / jnp.sqrt(jnp.float32(d))
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v)
    return out.reshape(b, t, h, d), cache


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * weight).astype(x.dtype)


def _dense(features: int, name: str, bias: bool = False, std: float = 0.02) -> nn.Dense:
    return nn.Dense(
        features, use_bias=bias, name=name, kernel_init=nn.initializers.normal(stddev=std)
    )


class Attention(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, attention_fn: Callable, cache: Any):
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = _dense(cfg.num_heads * hd, "q_proj", cfg.qkv_bias)(x)
        k = _dense(cfg.num_kv_heads * hd, "k_proj", cfg.qkv_bias)(x)
        v = _dense(cfg.num_kv_heads * hd, "v_proj", cfg.qkv_bias)(x)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)  # [B, T, H, D]
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin)  # [B, T, K, D]
        v = v.reshape(b, t, cfg.num_kv_heads, hd)  # [B, T, K, D]
        out, cache = attention_fn(self.layer, q, k, v, cache)
        out = out.reshape(b, t, cfg.num_heads * hd)
        std = 0.02 / (2 * cfg.num_layers) ** 0.5
        return _dense(cfg.hidden_size, "o_proj", std=std)(out), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, "up_proj")(x)
        std = 0.02 / (2 * cfg.num_layers) ** 0.5
        return _dense(cfg.hidden_size, "down_proj", std=std)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, attention_fn, cache):
        h, cache = Attention(self.cfg, self.layer, name="self_attn")(
            RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(x), cos, sin, attention_fn, cache
        )
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(
            RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        )
        return x, cache


class Transformer(nn.Module):
    """Decoder: tokens i32[B,T], positions i32[B,T] -> logits f32[B,T,V], caches.

    `caches` is a per-layer sequence handed to `attention_fn` (or None).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_fn: Callable = causal_attention,
        caches: Any = None,
        logits_at: jax.Array | None = None,
    ):
        """`logits_at` i32[B, R] (optional): compute the logits only at these token indices
        (returns f32[B, R, V]); every token still runs through the layers (K/V, caches)."""
        cfg = self.cfg
        embed = self.param(
            "embed_tokens", nn.initializers.normal(stddev=0.02), (cfg.vocab_size, cfg.hidden_size)
        )
        x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, Dh]
        new_caches = []
        for i in range(cfg.num_layers):
            layer_cache = None if caches is None else caches[i]
            x, layer_cache = DecoderLayer(cfg, i, name=f"layers_{i}")(
                x, cos, sin, attention_fn, layer_cache
            )
            new_caches.append(layer_cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, embed)
        else:
            logits = _dense(cfg.vocab_size, "lm_head")(x)
        return logits.astype(jnp.float32), new_caches


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random parameters (the `params` collection) for `cfg`."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    return Transformer(cfg).init(jax.random.PRNGKey(seed), tokens, tokens)["params"]


def forward_causal(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full causal forward: tokens i32[B,T] -> logits f32[B,T,V] (training, checking)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions)
    return logits
