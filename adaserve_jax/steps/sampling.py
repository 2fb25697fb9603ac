"""Keyed per-token sampling on device.

Every draw is keyed by `(request seed, absolute position of the produced token)`,
so the same request yields the same tokens whether its tokens are produced one
per step (autoregressive) or checked many at a time (speculative verification):
that is what makes seeded speculative sampling lossless (DESIGN.md §1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_key(seed: jax.Array, position: jax.Array) -> jax.Array:
    """PRNG key for the token produced *at* `position` by a request seeded `seed`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), seed), position)


def _filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits f32[V] -> temperature-scaled logits with top-k / top-p tails set to -inf."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled)  # [V]
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = sorted_desc[k - 1]
    probs = jax.nn.softmax(sorted_desc)
    cum_before = jnp.cumsum(probs) - probs  # mass strictly above each sorted entry
    keep = cum_before < top_p  # always keeps the first entry
    pth = jnp.min(jnp.where(keep, sorted_desc, jnp.inf))
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(
    logits: jax.Array,
    positions: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seed: jax.Array,
) -> jax.Array:
    """Next token for each row: logits f32[T,V], the rest [T] -> i32[T].

    Row t produces the token at position `positions[t] + 1`. temperature == 0 is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        def one(lg, temp, k, p, s, pos):
            filtered = _filter_logits(lg, temp, k, p)
            gumbel = jax.random.gumbel(token_key(s, pos + 1), lg.shape, jnp.float32)
            return jnp.argmax(filtered + gumbel).astype(jnp.int32)

        sampled = jax.vmap(one)(logits, temperature, top_k, top_p, seed, positions)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
