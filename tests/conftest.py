"""Shared fixtures: a tiny random model and one warmed engine per session."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaserve_jax import Engine, ModelConfig
from adaserve_jax.model import Model, forward_causal, init_params

TINY_BUCKETS = dict(token_buckets=(1, 4, 16, 64), ctx_buckets=(64, 256))


@pytest.fixture(scope="session")
def tiny_model() -> Model:
    cfg = ModelConfig.tiny(vocab_size=256, eos_token_id=None)
    # Scale the 0.02-std init up so attention is peaked and logits are far apart:
    # with near-uniform attention, a wrong mask or position would go unnoticed.
    params = jax.tree.map(
        lambda x: np.asarray(x) * (6.0 if x.ndim == 2 else 1.0), init_params(cfg, 1)
    )
    return Model(cfg, params)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model) -> Engine:
    return Engine(tiny_model, max_batch=3, token_budget=64, progress=False, **TINY_BUCKETS)


def greedy_reference(model: Model, prompt: list[int], n: int, pad_to: int = 256) -> list[int]:
    """Greedy decoding by full causal forwards over a fixed padded length (one compile)."""
    fwd = jax.jit(lambda p, t: forward_causal(p, model.config, t))
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, pad_to), np.int32)
        buf[0, : len(ids)] = ids
        logits = fwd(model.params, jnp.asarray(buf))
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids[len(prompt) :]
