"""Full generation through the Pallas kernel (interpret mode) equals the XLA path."""

import numpy as np
import pytest

from adaserve_jax import Engine


def test_pallas_interpret_generation_matches_xla(tiny_model, tiny_engine):
    engine = Engine(
        tiny_model,
        attention_impl="pallas_interpret",
        max_batch=2,
        token_buckets=(1, 4, 16, 64),
        ctx_buckets=(64,),
        progress=False,
    )
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (9, 30, 4)]
    for kw in ({}, dict(temperature=0.8, top_k=30, seed=2)):
        got = engine.generate(prompts, max_tokens=12, **kw)
        want = tiny_engine.generate(prompts, max_tokens=12, **kw)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_unknown_attention_impl(tiny_model):
    with pytest.raises(ValueError, match="attention_impl"):
        Engine(tiny_model, attention_impl="cuda-magic", warmup=False)
