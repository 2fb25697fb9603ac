"""Speculative verification is lossless: any tree, greedy or seeded sampling."""

import numpy as np
import pytest
from conftest import TINY_BUCKETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaserve_jax import Engine, ModelConfig
from adaserve_jax.engine.batch import Move, SamplingParams, Segment
from adaserve_jax.engine.tree import accept_path
from adaserve_jax.model import Model, init_params


@pytest.fixture(scope="module")
def spec_engines(tiny_model):
    """The tiny target with itself as draft (high acceptance) and with a weaker draft."""
    import jax

    dcfg = ModelConfig.tiny(vocab_size=256, num_layers=1, eos_token_id=None)
    params = jax.tree.map(lambda x: np.asarray(x) * 6.0 if x.ndim == 2 else x, init_params(dcfg, 2))
    other = Model(dcfg, params)
    kw = dict(
        max_batch=3, progress=False, policies=("spec:3", "tree:3,2", "adaserve"), **TINY_BUCKETS
    )
    return {"self": Engine(tiny_model, tiny_model, **kw), "other": Engine(tiny_model, other, **kw)}


PROMPTS = [list(np.random.default_rng(7).integers(0, 256, n)) for n in (5, 70, 17, 3)]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)


@pytest.mark.parametrize("draft", ["self", "other"])
@pytest.mark.parametrize("policy", ["spec:3", "tree:3,2", "adaserve"])
@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_policies_are_token_identical_to_autoregressive(spec_engines, draft, policy, sampling):
    engine = spec_engines[draft]
    ref = engine.generate(PROMPTS, max_tokens=16, **sampling)
    before = engine.compile_count()
    out = engine.generate(PROMPTS, max_tokens=16, policy=policy, **sampling)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert engine.compile_count() == before  # speculation never retraces
    steps = sum(o.stats.steps for o in out)
    accepted = sum(o.stats.accepted for o in out)
    assert steps > 0 and all(o.stats.selected >= o.stats.accepted for o in out)
    if draft == "self" and not sampling and policy.startswith("spec:"):
        # a draft identical to the target drafts the greedy chain: always fully accepted
        # (the last step of a request may verify a shorter chain: only the tokens it needs)
        assert accepted == sum(o.stats.selected for o in out) >= steps * 3 - len(out) * 3
    elif draft == "self" and not sampling and policy.startswith("tree:"):
        assert accepted >= steps * 2  # beam trees may drop the greedy path at depth 3
    elif draft == "self" and not sampling:
        assert accepted > 0  # adaserve verifies what its budget allows


def _reference(engine, prompt, n, sampling):
    (out,) = engine.generate([prompt], max_tokens=n, **sampling)
    return out.token_ids


@st.composite
def random_tree(draw):
    n = draw(st.integers(1, 24))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    on_path = [draw(st.floats(0, 1)) < 0.7 for _ in range(n)]
    noise = [draw(st.integers(0, 255)) for _ in range(n)]
    return np.array(parents, np.int32), on_path, noise


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tree=random_tree(),
    prompt_len=st.integers(1, 40),
    sampled=st.booleans(),
)
def test_any_tree_verifies_losslessly_and_compacts(tiny_engine, tree, prompt_len, sampled):
    parents, on_path, noise = tree
    prompt = list(range(3, 3 + prompt_len))
    sampling = dict(SAMPLED) if sampled else {}
    ref = _reference(tiny_engine, prompt, 28, sampling)
    sp = SamplingParams(**sampling) if sampled else SamplingParams()
    depth = np.zeros(len(parents), int)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    # tokens: the true continuation where the coin says so, noise elsewhere
    tokens = np.array(
        [ref[0]]
        + [ref[d] if ok else x for d, ok, x in zip(depth[1:], on_path[1:], noise[1:], strict=True)],
        np.int32,
    )
    eng = tiny_engine
    n0 = len(prompt)
    sampled_prefill, _ = eng.forward([Segment.chain(0, 0, prompt, sp)])
    assert int(sampled_prefill[-1]) == ref[0]
    target, _ = eng.forward([Segment(0, n0, tokens, parents, sp)])
    path, emitted = accept_path(parents, tokens, target)
    assert emitted == ref[1 : 1 + len(emitted)]
    assert [int(tokens[i]) for i in path] == emitted[:-1]
    moves = [Move(0, n0 + node, n0 + i) for i, node in enumerate(path, 1) if node != i]
    # continue one token past the accepted path: compaction applied, rejected rows unseen
    cached = n0 + 1 + len(path)
    nxt, _ = eng.forward([Segment.chain(0, cached, [emitted[-1]], sp)], moves)
    assert int(nxt[0]) == ref[1 + len(emitted)]


def test_bad_trees_rejected_before_device_work(tiny_engine):
    before = tiny_engine.compile_count()
    cases = [
        (Segment(0, 4, np.array([1, 2, 3]), np.array([-1, 2, 1])), "no cycles"),
        (Segment(0, 4, np.array([1, 2]), np.array([-1, 5])), "no cycles"),
        (Segment(0, 4, np.array([1, 999]), np.array([-1, 0])), "token ids"),
        (Segment(0, 250, np.arange(10), np.arange(-1, 9)), "cache rows"),
        (Segment(7, 0, np.array([1]), np.array([-1])), "slot=7"),
    ]
    for seg, match in cases:
        with pytest.raises(ValueError, match=match):
            tiny_engine.forward([seg])
    assert tiny_engine.compile_count() == before


@pytest.mark.parametrize("policy", ["spec:3", "tree:3,2"])
def test_draft_kv_reuse_drafts_the_same_trees(spec_engines, policy):
    """Accepted nodes whose K/V the expansion already wrote to the draft cache skip the draft's
    catch-up; the draft must then propose exactly the trees it proposes when every accepted
    token is caught up (a wrong row, position or slot changes its later trees)."""
    from adaserve_jax.scheduler.loop import Scheduler

    engine = spec_engines["self"]  # the draft agrees with the target: long accepted paths

    def run(reuse: bool):
        trees, catch_up = [], []
        expand, draft_step = engine.expand, engine.draft_step

        def spy_expand(root_vals, root_toks, root_pos, shape):
            out = expand(root_vals, root_toks, root_pos, shape)
            live = root_pos >= 0
            trees.append((out.tokens[live], out.log_f[live]))
            return out

        def spy_step(segments):
            catch_up.append(sum(len(s) for s in segments))
            return draft_step(segments)

        engine.expand, engine.draft_step = spy_expand, spy_step
        try:
            sched = Scheduler(engine, policy=policy, token_budget=engine.token_budget)
            sched.reuse_draft_kv = reuse
            states = [sched.submit(engine.make_request(p, max_tokens=24)) for p in PROMPTS[:3]]
            sched.run_until_done()
        finally:
            del engine.expand, engine.draft_step
        return [list(s.output) for s in states], trees, catch_up

    out_on, trees_on, fed_on = run(True)
    out_off, trees_off, fed_off = run(False)
    assert out_on == out_off
    assert len(trees_on) == len(trees_off) > 0
    for (tok_a, f_a), (tok_b, f_b) in zip(trees_on, trees_off, strict=True):
        np.testing.assert_array_equal(tok_a, tok_b)
        np.testing.assert_allclose(f_a, f_b, atol=1e-4)
    assert sum(fed_on) < sum(fed_off)  # the reuse did skip catch-up tokens


def test_topk_last_head_matches_topk_at_each_slots_last_token(tiny_model):
    """The draft's catch-up head: the LM head only at each slot's last token of the batch."""
    from adaserve_jax.engine.device import DeviceModel

    dev = DeviceModel(
        tiny_model, num_slots=4, max_len=256, heads=("topk", "topk_last"), **TINY_BUCKETS
    )
    segs = [Segment.chain(2, 0, [5, 6, 7]), Segment.chain(0, 0, [9]), Segment.chain(3, 0, [1, 2])]
    (vals, idx), batch = dev.run(segs, head="topk")
    dev2 = DeviceModel(
        tiny_model, num_slots=4, max_len=256, heads=("topk", "topk_last"), **TINY_BUCKETS
    )
    last_vals, last_idx = (np.asarray(x) for x in dev2._call(dev2.build(segs), "topk_last"))
    for seg, off in zip(segs, batch.offsets, strict=True):
        np.testing.assert_allclose(last_vals[seg.slot], vals[off + len(seg) - 1], atol=1e-5)
        np.testing.assert_array_equal(last_idx[seg.slot], idx[off + len(seg) - 1])
    assert not last_vals[1].any() and not last_idx[1].any()  # slot 1 had no tokens


def test_expansion_over_decoding_rows_only_matches_all_slots(tiny_model):
    """The expansion runs over the decoding slots padded to a row bucket: a slot's tree and
    the draft rows it writes are those of an expansion over every slot, idle slots' rows are
    left alone, and no row bucket compiles while serving."""
    from adaserve_jax.engine.speculation import DraftDevice
    from adaserve_jax.engine.tree import TreeShape, layout_depths
    from adaserve_jax.scheduler.confidence import sibling_rank

    shape = TreeShape(3, 2, 2)
    dd = DraftDevice(tiny_model, num_slots=8, max_len=256, shapes=[shape], **TINY_BUCKETS)
    dd.warmup(progress=False)
    assert dd.row_buckets == (1, 4, 8)
    compiled = dd.compile_count()
    rng = np.random.default_rng(3)
    ctx = [int(n) for n in rng.integers(3, 40, 8)]
    for s, n in enumerate(ctx):
        dd.step([Segment.chain(s, 0, rng.integers(0, 256, n))])
    vals, toks, _ = dd.step([Segment.chain(s, ctx[s], [int(s) + 1]) for s in range(8)])
    roots_v, roots_t = vals[:, :2], toks[:, :2]
    pos = np.asarray(ctx, np.int32)

    def cache_rows(slot):
        k, _ = dd.device._caches[0]
        return np.asarray(k[slot, pos[slot] + 1 : pos[slot] + 3])

    every = dd.expand(roots_v, roots_t, pos, shape)
    # the layout's sibling ranks are those the trees' parents imply
    np.testing.assert_array_equal(
        np.broadcast_to(every.rank, every.parents.shape), sibling_rank(every.parents)
    )
    # and its depths those of every tree
    depths = layout_depths(shape.num_nodes, shape.width, shape.topk)
    np.testing.assert_array_equal(np.broadcast_to(depths, every.depth.shape), every.depth)
    written = {s: cache_rows(s) for s in range(8)}
    for live in ([5], [0, 2, 7], [1, 2, 3, 4, 6]):  # row buckets 1, 4, 8
        idle = [s for s in range(8) if s not in live]
        k0, v0 = dd.device._caches[0]
        for s in idle:  # zero idle slots' rows: the call must not write them
            k0 = k0.at[s, pos[s] + 1 : pos[s] + 3].set(0.0)
        dd.device._caches[0] = (k0, v0)
        sub = dd.expand(roots_v, roots_t, np.where(np.isin(np.arange(8), live), pos, -1), shape)
        for s in live:
            np.testing.assert_array_equal(sub.tokens[s], every.tokens[s])
            np.testing.assert_array_equal(sub.parents[s], every.parents[s])
            np.testing.assert_allclose(sub.log_f[s], every.log_f[s], atol=1e-5)
            np.testing.assert_array_equal(sub.in_cache[s], every.in_cache[s])
            np.testing.assert_allclose(cache_rows(s), written[s], atol=1e-5)
        for s in idle:
            assert not cache_rows(s).any()
            assert not sub.in_cache[s].any()
    assert dd.compile_count() == compiled
