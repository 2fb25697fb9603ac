"""The scheduler's batched acceptance walks (padded and flat) and calibrator feed equal the
per-tree versions."""

from __future__ import annotations

import types

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve_jax.engine.batch import ragged_index
from adaserve_jax.engine.tree import accept_nodes, accept_path, accept_paths
from adaserve_jax.scheduler.confidence import AcceptanceCalibrator
from adaserve_jax.scheduler.loop import Scheduler


@st.composite
def verified_trees(draw):
    """Trees as a selector sends them: parents before children, distinct sibling tokens, and
    target tokens that often follow the drafted ones (so paths get long)."""
    trees = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 14))
        parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
        tokens, used = [7], {}
        for i in range(1, n):
            sib = used.setdefault(parents[i], set())
            tok = draw(st.integers(0, 5).filter(lambda t, sib=sib: t not in sib))
            sib.add(tok)
            tokens.append(tok)
        target = [draw(st.integers(0, 5)) for _ in range(n)]
        for i in range(1, n):  # make some drafted tokens right
            if draw(st.booleans()):
                target[parents[i]] = tokens[i]
        log_f = np.cumsum([0.0] + [-draw(st.floats(0.01, 3)) for _ in range(n - 1)])
        trees.append((np.array(parents), np.array(tokens), np.array(target), log_f))
    return trees


def _pad(trees, k, fill):
    width = max(len(t[0]) for t in trees)
    out = np.full((len(trees), width), fill, np.float64 if k == 3 else np.int64)
    for i, t in enumerate(trees):
        out[i, : len(t[k])] = t[k]
    return out


@settings(max_examples=60, deadline=None)
@given(trees=verified_trees())
def test_batched_walk_and_observations_match_per_tree(trees):
    lens = np.array([len(t[0]) for t in trees])
    parents, tokens, target = (_pad(trees, k, -1 if k == 0 else 0) for k in range(3))
    acc = accept_paths(parents, tokens, target, lens)
    ref = AcceptanceCalibrator()
    for i, (par, tok, tgt, log_f) in enumerate(trees):
        path, emitted = accept_path(par, tok, tgt)
        assert list(np.flatnonzero(acc[i, 1:]) + 1) == path
        assert not acc[i, lens[i] :].any()
        depth = np.zeros(len(par), np.int64)
        for c in range(1, len(par)):
            depth[c] = depth[par[c]] + 1
        rank = np.arange(len(par)) % 3
        if len(par) > 1:
            ref.observe_tree(par, log_f, path, depth, rank)
        trees[i] = (par, tok, tgt, log_f, depth, rank)
    # the scheduler's batched feed, on a stand-in scheduler, with what selection recorded
    stub = types.SimpleNamespace(calibrator=AcceptanceCalibrator())
    row_of, col, _ = ragged_index(lens)
    flat = [np.concatenate([t[k] for t in trees]) for k in (0, 3, 4, 5)]  # parents, log f, ...
    up = np.arange(col.size) - col + np.maximum(flat[0], 0)  # flat parent index
    # the flat walk (pointer doubling) accepts the same nodes as the padded one
    tok, tgt = (np.concatenate([t[k] for t in trees]) for k in (1, 2))
    match = (tok == tgt[up]) | (flat[0] < 0)
    assert np.array_equal(accept_nodes(up, match), acc[row_of, col])
    Scheduler._observe_trees(stub, acc[row_of, col], up, *flat)
    got = [np.concatenate(x) for x in zip(*stub.calibrator._pending, strict=True)]
    want = [np.concatenate(x) for x in zip(*ref._pending, strict=True)] if ref._pending else []
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):  # same edges in the same (tree, node) order
        np.testing.assert_allclose(a, b)
