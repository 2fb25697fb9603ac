"""The start-up latency profile: tables, the expansion call per shape, the JSON cache."""

import json

import pytest
from conftest import TINY_BUCKETS

from adaserve_jax import Engine
from adaserve_jax.engine.profiler import Profile, load_or_measure, shape_key


@pytest.fixture(scope="module")
def spec_engine(tiny_model):
    kw = dict(max_batch=3, progress=False, policies=("spec:2", "tree:3,2"), **TINY_BUCKETS)
    return Engine(tiny_model, tiny_model, **kw)


def test_profile_measures_every_expansion_shape_and_caches_it(spec_engine, tmp_path):
    draft = spec_engine.draft
    prof, path = load_or_measure(
        spec_engine.target, draft.device, expander=draft, cache_dir=tmp_path, progress=False
    )
    keys = {shape_key(s) for s in draft.shapes if s.depth > 1}
    assert keys == {"2,1,1", "3,2,2"} and draft.row_buckets == (1, 3)
    assert set(prof.expand_ms) == keys
    for rows in prof.expand_ms.values():
        assert set(rows) == {1, 3} and all(ms > 0 for ms in rows.values())
    assert set(prof.verify_ms) == set(spec_engine.target.token_buckets)
    assert Profile.from_json(json.loads(path.read_text())) == prof

    # cached: the same file is read back, nothing is measured again
    again, path2 = load_or_measure(
        spec_engine.target, draft.device, expander=draft, cache_dir=tmp_path, progress=False
    )
    assert path2 == path and again == prof

    # a cached profile without the expansion shapes (written before they were profiled) is
    # measured again rather than used with free expansions
    data = json.loads(path.read_text())
    for stale in ({"2,1,1": {"1": 1.0, "3": 1.0}}, {"2,1,1": {"3": 1.0}, "3,2,2": {"3": 1.0}}):
        data["expand_ms"] = stale
        path.write_text(json.dumps(data))
        fresh, _ = load_or_measure(
            spec_engine.target, draft.device, expander=draft, cache_dir=tmp_path, progress=False
        )
        assert {k: set(v) for k, v in fresh.expand_ms.items()} == {k: {1, 3} for k in keys}
        assert fresh.expand_ms["2,1,1"][3] != 1.0


def test_engine_profile_has_expansion_for_its_policies(spec_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("ADASERVE_JAX_PROFILES", str(tmp_path))
    prof = spec_engine.run_profile(progress=False)
    assert {k: set(v) for k, v in prof.expand_ms.items()} == {"2,1,1": {1, 3}, "3,2,2": {1, 3}}
    assert spec_engine.profile_path.parent == tmp_path
    # still lossless afterwards: profiling wrote draft rows, not committed target state
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    ref = spec_engine.generate(prompts, max_tokens=8)
    out = spec_engine.generate(prompts, max_tokens=8, policy="spec:2")
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


def test_drafts_calls_are_timed_in_their_serving_sequence(spec_engine, tmp_path, monkeypatch):
    """In serving a draft step follows a verify step and an expansion follows a verify step
    and a draft step (the draft's weights no longer warm): the profiler times them so."""
    draft = spec_engine.draft
    calls = []

    def recorded(obj, name, label):
        inner = getattr(obj, name)

        def call(*args, **kwargs):
            calls.append(label)
            return inner(*args, **kwargs)

        monkeypatch.setattr(obj, name, call)

    recorded(spec_engine.target, "run", "T")
    recorded(draft.device, "run", "D")
    recorded(draft, "expand", "E")
    load_or_measure(
        spec_engine.target, draft.device, expander=draft, cache_dir=tmp_path, progress=False
    )
    seq = "".join(calls)
    verify_part, rest = seq[: seq.index("D") - 1], seq[seq.index("D") - 1 :]
    assert set(verify_part) == {"T"}
    draft_part, expand_part = rest[: rest.index("E") - 2], rest[rest.index("E") - 2 :]
    n_draft = len(draft.device.token_buckets)
    assert draft_part == "TD" * (len(draft_part) // 2) and len(draft_part) // 2 == 16 * n_draft
    assert expand_part == "TDE" * (len(expand_part) // 3)
    assert len(expand_part) // 3 == 16 * 2 * len(draft.row_buckets)  # 2 shapes


def test_time_calls_runs_before_ahead_of_every_call_untimed():
    from adaserve_jax.engine.profiler import time_calls

    seq = []
    times = time_calls(lambda: seq.append("c"), 4, before=lambda: seq.append("b"))
    assert seq == ["b", "c"] * 5  # one warm-up pair, then 4 timed calls
    assert len(times) == 4 and all(t >= 0 for t in times)
    seq.clear()
    assert len(time_calls(lambda: seq.append("c"), 3)) == 3 and seq == ["c"] * 4


def test_call_prices_pad_to_the_profiles_buckets():
    from adaserve_jax.engine.profiler import CallPrices
    from adaserve_jax.engine.tree import TreeShape

    prof = Profile(
        verify_ms={1: 4.0, 8: 9.0},
        draft_ms={1: 1.0, 4: 1.5, 16: 3.0},
        baseline_tpot_ms=4.0,
        expand_ms={"4,1,2": {1: 2.0, 4: 3.0}},
    )
    prices = CallPrices(prof)
    assert prices.verify_s(8) == pytest.approx(9.0e-3) and prices.verify_s(2) is None
    # a draft step pads to the draft's next bucket; past the largest it is not priced
    assert [prices.draft_s(t) for t in (1, 2, 4, 5, 16)] == pytest.approx(
        [1.0e-3, 1.5e-3, 1.5e-3, 3.0e-3, 3.0e-3]
    )
    assert prices.draft_s(17) is None
    # an expansion: its shape's next row bucket; an unmeasured shape or too many rows: None
    shape = TreeShape(depth=4, width=1, topk=2)
    assert prices.expand_s(shape, 1) == pytest.approx(2.0e-3)
    assert prices.expand_s(shape, 3) == pytest.approx(3.0e-3)
    assert prices.expand_s(shape, 5) is None
    assert prices.expand_s(TreeShape(depth=2, width=1, topk=1), 1) is None
    assert CallPrices(Profile({1: 4.0}, None, 4.0)).draft_s(1) is None
