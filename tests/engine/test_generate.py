import numpy as np
import pytest
from conftest import greedy_reference


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(0, 256, n)] for n in lengths]


def test_greedy_matches_full_forward_with_continuous_batching(tiny_engine, tiny_model):
    # 5 prompts on 3 slots: finished requests' slots are reused; prompt of 90 is chunked.
    prompts = _prompts(0, (5, 90, 17, 3, 30))
    outs = tiny_engine.generate(prompts, max_tokens=12)
    for p, o in zip(prompts, outs, strict=True):
        assert o.finish_reason == "length"
        assert o.token_ids == greedy_reference(tiny_model, p, 12)
        assert o.text is None  # the tiny model has no tokenizer


def test_seeded_sampling_is_reproducible_and_independent_of_batching(tiny_engine):
    prompts = _prompts(1, (7, 12, 25))
    kw = dict(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    together = tiny_engine.generate(prompts, **kw)
    alone = tiny_engine.generate(prompts[:1], **kw)
    assert together[0].token_ids == alone[0].token_ids
    again = tiny_engine.generate(prompts, **kw)
    assert [o.token_ids for o in again] == [o.token_ids for o in together]
    other_seed = tiny_engine.generate(prompts, **{**kw, "seed": 12})
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in together]


def test_top_k_one_is_greedy(tiny_engine):
    prompts = _prompts(2, (9, 4))
    greedy = tiny_engine.generate(prompts, max_tokens=8)
    topk1 = tiny_engine.generate(prompts, max_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]


def test_serving_never_retraces(tiny_engine):
    before = tiny_engine.target.compile_count()
    assert before == len(tiny_engine.target.variants())
    tiny_engine.generate(_prompts(3, (1, 63, 64, 65, 200)), max_tokens=5)
    tiny_engine.generate(_prompts(4, (10,)), max_tokens=3, temperature=1.0, seed=1)
    assert tiny_engine.target.compile_count() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1] * 250], max_tokens=10), "exceeds the context"),
        (dict(prompts=[[1, 2]], max_tokens=0), "max_tokens"),
        (dict(prompts=[[1, 2]], max_tokens=4, policy="beam"), "unknown policy"),
        (dict(prompts=["hello"], max_tokens=4), "tokenizer"),
        (dict(prompts=[[1, 999]], max_tokens=4), "vocabulary"),
        (dict(prompts=[[]], max_tokens=4), "empty"),
        (dict(prompts=[[1]], max_tokens=4, temperature=-1.0), "temperature"),
        (dict(prompts=[[1]], max_tokens=4, top_p=0.0), "top_p"),
    ],
)
def test_bad_input_raises_before_device_work(tiny_engine, kwargs, match):
    before = tiny_engine.target.compile_count()
    with pytest.raises(ValueError, match=match):
        tiny_engine.generate(**kwargs)
    assert tiny_engine.target.compile_count() == before
