"""Online acceptance calibration of draft path probabilities, and the SLO-need horizons."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve_jax.scheduler.confidence import AcceptanceCalibrator, sibling_rank
from adaserve_jax.scheduler.selector import SelectionInput, select, slo_need

SETTINGS = settings(max_examples=60, deadline=None)


def random_forest(rng: np.random.Generator, rows: int, cols: int):
    """Padded trees in the expansion's layout: parents precede children, a parent's children
    in descending conditional probability; returns parents, raw log f, depth."""
    parents = np.full((rows, cols), -1, np.int32)
    log_f = np.zeros((rows, cols), np.float32)
    depth = np.zeros((rows, cols), np.int32)
    for r in range(rows):
        last_q = {}
        for j in range(1, cols):
            p = int(rng.integers(0, j))
            q = float(rng.uniform(0.01, 1.0))
            q = min(q, last_q.get(p, 1.0))  # siblings in descending order
            last_q[p] = q
            parents[r, j] = p
            log_f[r, j] = log_f[r, p] + np.float32(np.log(q))
            depth[r, j] = depth[r, p] + 1
    return parents, log_f, depth


def test_sibling_rank_counts_earlier_siblings():
    parents = np.array([[-1, 0, 0, 1, 1, 0, 3]])
    assert sibling_rank(parents).tolist() == [[0, 0, 1, 0, 1, 2, 0]]


def test_without_evidence_the_calibrated_f_is_the_raw_f():
    cal = AcceptanceCalibrator()
    parents, log_f, depth = random_forest(np.random.default_rng(0), 6, 12)
    out = cal.apply(parents, log_f, depth, sibling_rank(parents))
    # prior pseudo-counts sit at the raw q: only the last half bin (q > 0.86) is rounded
    assert np.all(np.abs(out - log_f) <= 0.16 * depth + 1e-5)
    assert out[:, 0].tolist() == [0.0] * 6


def test_learns_rank_dependent_acceptance_independent_of_q():
    """Top children accepted 90% of the time and runners-up 10%, whatever q says."""
    rng = np.random.default_rng(1)
    cal = AcceptanceCalibrator(decay=1.0)
    for _ in range(200):
        log_q = np.log(rng.uniform(0.02, 0.6, 64))
        rank = rng.integers(0, 2, 64)
        depth = rng.integers(1, 5, 64)
        hit = rng.random(64) < np.where(rank == 0, 0.9, 0.1)
        cal.observe(log_q, depth, rank, hit)
    rates = cal.rates()
    seen = cal.verified > 50
    assert np.all(np.abs(rates[0][seen[0]] - 0.9) < 0.08)
    assert np.all(np.abs(rates[1][seen[1]] - 0.1) < 0.08)
    # a chain of three top children, raw q = 0.05 each, is now worth ~0.9^3
    parents = np.array([[-1, 0, 1, 2]])
    log_f = np.log(np.array([[1.0, 0.05, 0.0025, 0.000125]], np.float32))
    depth = np.array([[0, 1, 2, 3]])
    out = cal.apply(parents, log_f, depth, sibling_rank(parents))
    np.testing.assert_allclose(np.exp(out[0]), [1, 0.9, 0.81, 0.729], atol=0.06)


def test_observe_tree_counts_only_edges_out_of_accepted_nodes():
    cal = AcceptanceCalibrator(decay=1.0)
    # root -> 1 -> 3, root -> 2; path accepted: [1]; node 3's parent (1) accepted, so 1, 2, 3
    # are all observed; node 4 hangs off the rejected node 2 and is not
    parents = np.array([-1, 0, 0, 1, 2])
    log_f = np.log(np.array([1.0, 0.5, 0.3, 0.25, 0.15], np.float32))
    depth = np.array([0, 1, 1, 2, 2])
    cal.observe_tree(parents, log_f, [1], depth, sibling_rank(parents[None])[0])
    assert cal.observations == 0  # queued until flush
    cal.flush()
    assert cal.observations == 3
    assert cal.accepted.sum() == 1


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 16))
def test_calibrated_trees_stay_valid_for_the_selector(seed, rows, cols):
    """Whatever was observed, calibrated f is non-increasing along paths, the root stays at
    f = 1, and the selector accepts and selects connected trees from it."""
    rng = np.random.default_rng(seed)
    cal = AcceptanceCalibrator()
    n_obs = int(rng.integers(0, 300))
    cal.observe(
        np.log(rng.uniform(1e-4, 1.0, n_obs)),
        rng.integers(1, 10, n_obs),
        rng.integers(0, 5, n_obs),
        rng.random(n_obs) < rng.random(),
    )
    parents, log_f, depth = random_forest(rng, rows, cols)
    out = cal.apply(parents, log_f, depth, sibling_rank(parents))
    assert np.all(out[:, 0] == 0)
    for j in range(1, cols):
        assert np.all(out[:, j] <= out[np.arange(rows), parents[:, j]])
    sel = select(
        SelectionInput(
            parents=parents,
            log_f=out,
            num_nodes=np.full(rows, cols),
            decoded=np.zeros(rows),
            elapsed_s=np.zeros(rows),
            tpot_slo_s=np.ones(rows),
            budget=rows * max(1, cols // 2),
            t_iter_s=1.0,
        )
    )
    for r, nodes in enumerate(sel.nodes):
        assert nodes[0] == 0 and set(parents[r, nodes[1:]].tolist()) <= set(nodes.tolist())


def test_rates_are_monotone_in_q_even_for_contrary_evidence():
    cal = AcceptanceCalibrator(decay=1.0)
    # low q always accepted, high q never: the fit pools them instead of inverting the order
    cal.observe(np.full(100, np.log(0.02)), np.ones(100), np.zeros(100), np.ones(100, bool))
    cal.observe(np.full(100, np.log(0.8)), np.ones(100), np.zeros(100), np.zeros(100, bool))
    rates = cal.rates()
    assert np.all(np.diff(rates, axis=-1) >= -1e-12)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bins": 1}, "bins"),
        ({"depths": 0}, "depths"),
        ({"ranks": 0}, "ranks"),
        ({"log_q_min": 0.0}, "log_q_min"),
        ({"prior_weight": 0.0}, "prior_weight"),
        ({"decay": 0.0}, "decay"),
        ({"refit_every": 0}, "refit_every"),
    ],
)
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AcceptanceCalibrator(**kwargs)


def test_bad_observations_are_named():
    cal = AcceptanceCalibrator()
    with pytest.raises(ValueError, match="shape"):
        cal.observe(np.zeros(2), np.ones(3), np.zeros(2), np.zeros(2, bool))
    with pytest.raises(ValueError, match="log_q"):
        cal.observe(np.array([np.nan]), np.ones(1), np.zeros(1), np.zeros(1, bool))
    with pytest.raises(ValueError, match="depth"):
        cal.observe(np.array([-1.0]), np.zeros(1), np.zeros(1), np.zeros(1, bool))
    with pytest.raises(ValueError, match="rank"):
        cal.observe(np.array([-1.0]), np.ones(1), -np.ones(1), np.zeros(1, bool))


def test_slo_need_horizons():
    t, t_iter = 0.05, 0.1
    # on track (l = o t): both horizons ask for t_iter / t = 2 tokens
    assert slo_need(np.array([1.0]), np.array([20]), np.array([t]), t_iter)[0] == pytest.approx(2)
    assert slo_need(np.array([1.0]), np.array([20]), np.array([t]), t_iter, np.array([80]))[
        0
    ] == pytest.approx(2)
    # 10 tokens behind with 80 to go: the paper's horizon wants all 10 now, the request's
    # horizon spreads them: 0.1 * 80 / (0.05 * 100 - 1.5) = 2.2857
    paper = slo_need(np.array([1.5]), np.array([20]), np.array([t]), t_iter)[0]
    spread = slo_need(np.array([1.5]), np.array([20]), np.array([t]), t_iter, np.array([80]))[0]
    assert paper == pytest.approx(12) and spread == pytest.approx(0.1 * 80 / 3.5)
    # past its deadline for the whole request: best effort (-1), served last
    assert slo_need(np.array([6.0]), np.array([20]), np.array([t]), t_iter, np.array([80]))[0] < 0


def _pava(y: list[float], w: list[float]) -> list[float]:
    """Reference: the textbook pool-adjacent-violators, one pair at a time."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for yi, wi in zip(y, w, strict=True):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks[-1]
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return [m for m, _, n in blocks for _ in range(n)]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), n=st.integers(1, 25))
def test_isotonic_rows_is_pool_adjacent_violators_per_row(seed, rows, n):
    from adaserve_jax.scheduler.confidence import isotonic_rows

    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 1, (rows, n))
    if seed % 3 == 0:
        y = np.sort(y, axis=1)[:, ::-1]  # all decreasing: one pool per row
    w = rng.uniform(0.1, 10, (rows, n))
    got = isotonic_rows(y, w)
    assert np.all(np.diff(got, axis=1) >= -1e-12)
    for r in range(rows):
        np.testing.assert_allclose(got[r], _pava(y[r].tolist(), w[r].tolist()), rtol=1e-12)


def test_flush_checks_queued_edges_unless_all_are_trusted():
    """The scheduler's own edges (trusted) are counted as they are; anything else queued still
    goes through `observe`'s checks, and both count alike."""
    rng = np.random.default_rng(0)
    q = -rng.exponential(1.0, 50)
    d, k, hit = rng.integers(1, 6, 50), rng.integers(0, 4, 50), rng.random(50) < 0.5
    checked, trusted = AcceptanceCalibrator(), AcceptanceCalibrator()
    checked.observe_edges(q, d, k, hit)
    trusted.observe_edges(q, d, k, hit, trusted=True)
    checked.flush(), trusted.flush()
    assert np.array_equal(checked.verified, trusted.verified)
    assert np.array_equal(checked.accepted, trusted.accepted)
    # one untrusted batch among trusted ones: the flush checks them all
    trusted.observe_edges(q, d, k, hit, trusted=True)
    trusted.observe_edges(np.array([np.nan]), np.ones(1), np.zeros(1), np.zeros(1, bool))
    with pytest.raises(ValueError, match="log_q"):
        trusted.flush()
