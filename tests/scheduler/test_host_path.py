"""The vectorized host path's building blocks equal their plain definitions: segments and KV
moves cut from flat arrays, the roster cache, sibling ranks, the calibrated path sums and
the selector's hot-path entry point."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_confidence import random_forest
from test_selector import inputs_st

from adaserve_jax.engine.batch import (
    GREEDY,
    Move,
    SamplingParams,
    Segment,
    SegmentBatch,
    validate_segments,
)
from adaserve_jax.engine.tree import layout_depths, layout_ranks, tree_size
from adaserve_jax.scheduler.confidence import AcceptanceCalibrator, sibling_rank
from adaserve_jax.scheduler.request import Request, RequestState
from adaserve_jax.scheduler.roster import NO_SLO_MS, Roster
from adaserve_jax.scheduler.segments import moves, segments
from adaserve_jax.scheduler.selector import select, select_nodes

SETTINGS = settings(max_examples=60, deadline=None)


def _fields(seg: Segment) -> tuple:
    return (seg.slot, seg.ctx_len, seg.tokens.tolist(), seg.parents.tolist(), seg.sampling,
            seg.tokens.dtype, seg.parents.dtype)  # fmt: skip


def test_segments_equal_the_constructors():
    hot = SamplingParams(temperature=0.7, seed=3)
    tokens = np.arange(10, 20, dtype=np.int32)
    ends = [3, 4, 10]
    chains = segments([5, 1, 2], [7, 0, 30], tokens, None, ends, [GREEDY, hot, GREEDY])
    want = [Segment.chain(5, 7, [10, 11, 12]), Segment.chain(1, 0, [13], hot),
            Segment.chain(2, 30, list(range(14, 20)))]  # fmt: skip
    assert [type(s) for s in chains] == [Segment] * 3
    assert [_fields(s) for s in chains] == [_fields(s) for s in want]
    parents = np.array([-1, 0, 0, -1, -1, 0, 1, 1, 2, 0], np.int32)
    trees = segments([5, 1, 2], [7, 0, 30], tokens, parents, ends)
    want = [Segment(5, 7, tokens[:3], parents[:3]), Segment(1, 0, tokens[3:4], parents[3:4]),
            Segment(2, 30, tokens[4:], parents[4:])]  # fmt: skip
    assert [_fields(s) for s in trees] == [_fields(s) for s in want]
    assert list(segments([], [], tokens[:0], None, [])) == []


def test_segment_batch_is_the_sequence_of_its_segments():
    """`SegmentBatch.of` a list, `+` with lists and batches, indexing and the chain test agree
    with the `Segment`s themselves; the engines' checks see a bad segment inside a batch."""
    hot = SamplingParams(temperature=0.7, seed=3)
    segs = [Segment.chain(5, 7, [10, 11, 12]), Segment(1, 0, np.array([13, 14, 15], np.int32),
            np.array([-1, 0, 0], np.int32), hot), Segment.chain(2, 30, [16])]  # fmt: skip
    b = SegmentBatch.of(segs)
    assert len(b) == 3 and b.num_tokens == 7 and b.starts.tolist() == [0, 3, 6]
    assert [_fields(s) for s in b] == [_fields(s) for s in segs]
    assert _fields(b[-1]) == _fields(segs[-1]) and [_fields(s) for s in b[1:]] == [
        _fields(s) for s in segs[1:]
    ]
    with pytest.raises(IndexError):
        b[3]
    assert b.chains().tolist() == [s.is_chain() for s in segs] == [True, False, True]
    for joined in (b[:1] + SegmentBatch.of(segs[1:]), SegmentBatch.of(segs[:2]) + segs[2:],
                   segs[:1] + SegmentBatch.of(segs[1:]), b + [], [] + b):  # fmt: skip
        assert isinstance(joined, SegmentBatch)
        assert [_fields(s) for s in joined] == [_fields(s) for s in segs]
    assert SegmentBatch.of(b) is b and len(SegmentBatch.of([])) == 0
    fast = SegmentBatch.trusted(b.slots, b.ctx_lens.tolist(), b.lens, b.tokens, b.parents,
                                b.sampling)  # fmt: skip
    assert [_fields(s) for s in fast] == [_fields(s) for s in segs]
    validate_segments(b, vocab_size=32, num_slots=8, max_len=64)
    with pytest.raises(ValueError, match="token ids must be in"):
        validate_segments(b + [Segment.chain(3, 0, [40])], vocab_size=32, num_slots=8, max_len=64)
    # parents and tokens of different lengths whose totals agree: still caught per segment
    skewed = [Segment(0, 0, np.array([1, 2, 3], np.int32), np.array([-1, 0], np.int32)),
              Segment(1, 0, np.array([4], np.int32), np.array([-1, -1], np.int32))]  # fmt: skip
    with pytest.raises(ValueError, match="parents shape"):
        validate_segments(skewed, vocab_size=32, num_slots=8, max_len=64)
    with pytest.raises(ValueError, match="one entry per segment"):
        SegmentBatch([1, 2], [0], [1, 1], [3, 4], [-1, -1])


def test_moves_equal_the_constructor():
    got = moves([1, 1, 4], [10, 12, 7], [9, 10, 6])
    assert got == [Move(1, 10, 9), Move(1, 12, 10), Move(4, 7, 6)]
    assert all(type(m) is Move for m in got)


def _state(i: int, slot: int, first: float | None, slo: float | None = 50.0) -> RequestState:
    r = RequestState(Request(f"r{i}", (1, 2, 3), 10 + i, tpot_slo_ms=slo), arrival=0.0)
    r.slot, r.first_token_time = slot, first
    return r


def test_roster_fields_and_reuse():
    a, b, c = _state(0, 3, 1.5), _state(1, 0, 2.0, slo=None), _state(2, 1, 0.25)
    roster = Roster.build([a, b, c])
    assert roster.slots_l == [3, 0, 1] and roster.slots.tolist() == [3, 0, 1]
    assert roster.max_tokens.tolist() == [10, 11, 12] and roster.prompt_len == [3, 3, 3]
    assert roster.tpot_slo_s.tolist() == [0.05, NO_SLO_MS / 1e3, 0.05]
    assert roster.elapsed(4.0).tolist() == [4.0 - 1.5, 4.0 - 2.0, 4.0 - 0.25]
    assert roster.matches([a, b, c])
    assert not roster.matches([a, c, b]) and not roster.matches([a, b])
    assert not roster.matches([a, b, _state(2, 1, 0.25, slo=36.0)])


def test_roster_without_first_token_is_rebuilt_and_elapsed_is_zero():
    a, b = _state(0, 0, 1.0), _state(1, 1, None)
    roster = Roster.build([a, b])
    assert roster.elapsed(3.0).tolist() == [2.0, 0.0]  # as `now - (first or now)`
    assert not roster.matches([a, b])  # its first token may come: read again next time


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(0, 6), cols=st.integers(1, 14))
def test_sibling_rank_counts_earlier_siblings_anywhere(seed, rows, cols):
    rng = np.random.default_rng(seed)
    parents = np.full((rows, cols), -1, np.int64)
    for j in range(1, cols):  # arbitrary trees: siblings need not be adjacent
        parents[:, j] = rng.integers(0, j, rows)
    want = [[0] + [int(np.sum(row[:j] == row[j])) for j in range(1, cols)] for row in parents]
    assert sibling_rank(parents).tolist() == want


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 16))
def test_calibrated_path_sums_follow_the_paths_exactly(seed, rows, cols):
    """apply adds each node's calibrated conditional to its parent's calibrated f, in float32,
    in path order: exactly the one-column-at-a-time definition."""
    rng = np.random.default_rng(seed)
    cal = AcceptanceCalibrator()
    n = int(rng.integers(0, 200))
    cal.observe(np.log(rng.uniform(1e-4, 1, n)), rng.integers(1, 10, n), rng.integers(0, 5, n),
                rng.random(n) < 0.5)  # fmt: skip
    parents, log_f, depth = random_forest(rng, rows, cols)
    rank = sibling_rank(parents)
    out = cal.apply(parents, log_f, depth, rank)
    step = np.zeros((rows, cols), np.float32)
    want = log_f.copy()
    for j in range(1, cols):
        p = parents[:, j]
        q = log_f[:, j] - log_f[np.arange(rows), p]
        step[:, j] = cal.log_rate(q, np.maximum(depth[:, j], 1), rank[:, j]).astype(np.float32)
        want[:, j] = want[np.arange(rows), p] + step[:, j]
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out, want)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2)),
)
def test_calibrated_path_sums_per_column_layout_equal_per_node(seed, rows, shape):
    """Depths and ranks given once per column (a drafted layout: engine/tree.py
    `layout_depths` / `layout_ranks`) give exactly the per-node result."""
    depth, width, extra = shape
    topk = width + extra
    n = tree_size(depth, width, topk)
    rng = np.random.default_rng(seed)
    cal = AcceptanceCalibrator()
    m = int(rng.integers(0, 200))
    cal.observe(np.log(rng.uniform(1e-4, 1, m)), rng.integers(1, 10, m), rng.integers(0, 5, m),
                rng.random(m) < 0.5)  # fmt: skip
    # random trees in the layout: each depth's children hang off any node of the previous depth
    d_col, k_col = layout_depths(n, width, topk), layout_ranks(n, topk)
    parents = np.full((rows, n), -1, np.int32)
    log_f = np.zeros((rows, n), np.float32)
    for j in range(1, n):
        prev = np.flatnonzero(d_col == d_col[j] - 1)
        parents[:, j] = rng.choice(prev, rows)
        log_f[:, j] = log_f[np.arange(rows), parents[:, j]] + np.log(rng.uniform(0.01, 1, rows))
    want = cal.apply(parents, log_f, np.broadcast_to(d_col, parents.shape),
                     np.broadcast_to(k_col, parents.shape))  # fmt: skip
    for _ in range(2):  # the second call reuses the cached layout
        assert np.array_equal(cal.apply(parents, log_f, d_col, k_col), want)


@SETTINGS
@given(inputs_st())
def test_select_nodes_is_select_flattened(inp):
    nodes, counts = select_nodes(inp)
    sel = select(inp)
    assert nodes.tolist() == sel.node_index.tolist()
    assert counts.tolist() == sel.num_selected.tolist()
