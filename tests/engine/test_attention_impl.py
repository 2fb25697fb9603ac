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


def test_draft_expansion_through_the_kernel_matches_xla(tiny_model):
    """The draft's tree expansion runs its attention through the Pallas kernel (interpret
    mode) when attention_impl is pallas: same trees as the fused XLA attention, and the same
    speculation statistics and tokens end to end."""
    from adaserve_jax.engine.tree import TreeShape

    kw = dict(
        max_batch=2,
        token_buckets=(1, 4, 16, 64),
        ctx_buckets=(64,),
        progress=False,
        policies=("tree:3,2",),
    )
    engines = {
        impl: Engine(tiny_model, tiny_model, attention_impl=impl, **kw)
        for impl in ("xla", "pallas_interpret")
    }
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, n).tolist() for n in (11, 23)]
    outs = {
        impl: e.generate(prompts, max_tokens=10, policy="tree:3,2") for impl, e in engines.items()
    }
    for a, b in zip(outs["xla"], outs["pallas_interpret"], strict=True):
        assert a.token_ids == b.token_ids
        assert (a.stats.drafted, a.stats.selected, a.stats.accepted) == (
            b.stats.drafted,
            b.stats.selected,
            b.stats.accepted,
        )
    # one expansion from the same committed draft state (both caches hold the same rows now)
    shape = TreeShape(3, 2, 2)
    root_vals = np.log(np.array([[0.6, 0.3], [0.5, 0.4]], np.float32))
    root_toks = np.array([[5, 9], [17, 3]], np.int32)
    root_pos = np.array([20, 30], np.int32)
    trees = {
        impl: e.draft.expand(root_vals, root_toks, root_pos, shape) for impl, e in engines.items()
    }
    np.testing.assert_array_equal(trees["xla"].tokens, trees["pallas_interpret"].tokens)
    np.testing.assert_array_equal(trees["xla"].parents, trees["pallas_interpret"].parents)
    np.testing.assert_allclose(trees["xla"].log_f, trees["pallas_interpret"].log_f, atol=1e-4)
