"""Models, prompts and the generation grid shared by the mesh subprocess cases.

Import only after XLA_FLAGS is set (this imports jax).
"""

from __future__ import annotations

import jax
import numpy as np

from adaserve_jax import Engine, ModelConfig
from adaserve_jax.model import Model, init_params

BUCKETS = dict(token_buckets=(1, 4, 16, 64), ctx_buckets=(64, 256))
PROMPTS = [list(np.random.default_rng(7).integers(0, 256, n)) for n in (5, 40, 3)]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)


def tiny(seed: int, **overrides) -> Model:
    cfg = ModelConfig.tiny(**{"num_heads": 4, "num_kv_heads": 4, "eos_token_id": None, **overrides})
    # peaked logits (as in tests/conftest.py): a wrong shard would change tokens, not decimals
    params = jax.tree.map(
        lambda x: np.asarray(x) * (6.0 if x.ndim == 2 else 1.0), init_params(cfg, seed)
    )
    return Model(cfg, params)


def generate_all(engine: Engine) -> dict[str, list[list[int]]]:
    out = {}
    for policy in ("autoregressive", "spec:2"):
        for name, sampling in (("greedy", {}), ("sampled", SAMPLED)):
            res = engine.generate(PROMPTS, max_tokens=12, policy=policy, **sampling)
            out[f"{policy}/{name}"] = [r.token_ids for r in res]
    return out
