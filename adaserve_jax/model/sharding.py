"""Tensor-parallel sharding rules of the decoder in `llama.py`, declared once.

Megatron-style tensor parallelism over one mesh axis (`TP`), written against the
parameter names of `llama.py` (Hugging Face's Llama layout):

    parameter                              shape          spec            split over
    embed_tokens                           [V, D]         P(TP, None)     vocab rows
    layers_i/self_attn/{q,k,v}_proj/kernel [D, N*Dh]      P(None, TP)     heads (output axis)
    layers_i/self_attn/{q,k,v}_proj/bias   [N*Dh]         P(TP)           heads
    layers_i/self_attn/o_proj/kernel       [H*Dh, D]      P(TP, None)     heads (input axis)
    layers_i/mlp/{gate,up}_proj/kernel     [D, F]         P(None, TP)     MLP hidden (output)
    layers_i/mlp/down_proj/kernel          [F, D]         P(TP, None)     MLP hidden (input)
    lm_head/kernel                         [D, V]         P(None, TP)     vocab columns
    *norm*/weight                          [D]            P()             replicated
    KV cache (k, v)                        [S, L, KVH, Dh] P(None, None, TP, None)  KV heads

A column split of q/k/v into `n` contiguous chunks gives each device `H/n` whole query heads and
the `KVH/n` KV heads they read (query head h reads KV head h // G), so attention needs no
communication; o_proj and down_proj are row-split and end in one all-reduce each (inserted by
XLA's SPMD partitioner). The vocabulary is split when `V % n == 0` (a vocab-parallel embedding
gather and vocab-parallel logits) and replicated otherwise.

This module is pure: it maps names and shapes to `PartitionSpec`s and checks divisibility;
`adaserve_jax/engine/mesh.py` turns them into `NamedSharding`s on a concrete mesh.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from adaserve_jax.model.config import ModelConfig

TP = "tp"  # the tensor-parallel mesh axis

# (path regex, spec). First match wins; a parameter matching none is an error, so a new
# parameter in llama.py cannot silently end up replicated (or worse, mis-split).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens", P(TP, None)),
    (r"layers_\d+/self_attn/[qkv]_proj/kernel", P(None, TP)),
    (r"layers_\d+/self_attn/[qkv]_proj/bias", P(TP)),
    (r"layers_\d+/self_attn/o_proj/kernel", P(TP, None)),
    (r"layers_\d+/mlp/(gate|up)_proj/kernel", P(None, TP)),
    (r"layers_\d+/mlp/down_proj/kernel", P(TP, None)),
    (r"lm_head/kernel", P(None, TP)),
    (r"(layers_\d+/(input|post_attention)_layernorm|norm)/weight", P()),
)
VOCAB_PARAMS = re.compile(r"embed_tokens|lm_head/kernel")

KV_CACHE_SPEC = P(None, None, TP, None)  # (k, v) f32[S, L, KVH, Dh]
HEADS_SPEC = P(None, TP, None)  # q f32[T, H, Dh], k/v new f32[T, KVH, Dh], attention output


def check_divisible(cfg: ModelConfig, num_devices: int) -> None:
    """ValueError unless `cfg` splits evenly over `num_devices` tensor-parallel devices."""
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices <= 0:
        raise ValueError(f"devices={num_devices!r} must be a positive int")
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(cfg, name)
        if value % num_devices:
            raise ValueError(
                f"devices={num_devices} does not divide the model's {name}={value}: "
                f"tensor parallelism splits {name} evenly across devices (pick a divisor of "
                f"{name}, e.g. one of {[d for d in range(1, value + 1) if value % d == 0]})"
            )


def shards_vocab(cfg: ModelConfig, num_devices: int) -> bool:
    """Whether the vocabulary axis is split (else embeddings / lm_head are replicated)."""
    return cfg.vocab_size % num_devices == 0


def param_path(path: tuple[Any, ...]) -> str:
    """'layers_0/self_attn/q_proj/kernel' from a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_spec(name: str, ndim: int, *, vocab_split: bool = True) -> P:
    """The PartitionSpec of one parameter (`name` as from `param_path`)."""
    for pattern, spec in PARAM_RULES:
        if re.fullmatch(pattern, name):
            if not vocab_split and VOCAB_PARAMS.fullmatch(name):
                return P()
            if len(spec) > ndim:
                raise ValueError(f"parameter {name} has {ndim} dims, its rule {spec} more")
            return spec
    raise ValueError(f"no sharding rule for parameter {name!r}; add one to PARAM_RULES")


def param_specs(params: Any, cfg: ModelConfig, num_devices: int) -> Any:
    """Pytree of PartitionSpecs matching `params` (after checking divisibility)."""
    check_divisible(cfg, num_devices)
    vocab_split = shards_vocab(cfg, num_devices)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(param_path(path), x.ndim, vocab_split=vocab_split), params
    )
