"""Adaptive tree depth/width (paper §5.2): exact values, clipping, monotonicity, validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve_jax.scheduler.tree_shape import TreeShape, TreeShapeConfig, tree_shape


def test_exact_values():
    cfg = TreeShapeConfig(verify_budget=64, draft_budget=32, c1=1, c2=0, min_depth=1,
                          max_depth=8, max_width=4)  # fmt: skip
    # n = 1: floor(64 / 2) - 1 = 31 -> 8; floor(32 / 1) = 32 -> 4.
    assert cfg.shape(1) == TreeShape(depth=8, width=4)
    # n = 7: floor(64 / 8) - 1 = 7; floor(32 / 7) = 4.
    assert cfg.shape(7) == TreeShape(7, 4)
    # n = 15: floor(64 / 16) - 1 = 3; floor(32 / 15) = 2.
    assert cfg.shape(15) == (3, 2)
    # n = 40: floor(64 / 41) - 1 = 0 -> 1; floor(32 / 40) = 0 -> 1.
    assert cfg.shape(40) == (1, 1)
    assert tree_shape(cfg, 15) == cfg.shape(15)


def test_constants_shift_the_shape():
    cfg = TreeShapeConfig(verify_budget=64, draft_budget=32, c1=3, c2=1, max_depth=20,
                          max_width=10)  # fmt: skip
    assert cfg.shape(5) == (64 // 8 - 1, 32 // 5 + 1)  # (7, 7)
    assert cfg.shape(5, verify_budget=128) == (128 // 8 - 1, 7)


def test_min_depth_zero_allows_plain_decoding():
    cfg = TreeShapeConfig(verify_budget=16, min_depth=0)
    assert cfg.shape(16).depth == 0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 512),
    st.integers(1, 256),
    st.integers(0, 4),
    st.integers(-2, 2),
    st.integers(0, 4),
    st.integers(0, 12),
    st.integers(1, 8),
    st.integers(1, 200),
)
def test_bounds_and_monotone_in_load(b1, b2, c1, c2, dmin, dspan, wmax, n):
    cfg = TreeShapeConfig(b1, b2, c1, c2, dmin, dmin + dspan, wmax)
    d, w = cfg.shape(n)
    assert dmin <= d <= dmin + dspan and 1 <= w <= wmax
    d2, w2 = cfg.shape(n + 1)
    assert d2 <= d and w2 <= w  # more requests never grow the tree
    assert cfg.shape(n, verify_budget=b1 + 7).depth >= d  # more budget never shrinks it


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verify_budget", 0),
        ("draft_budget", -1),
        ("max_width", 0),
        ("c1", -1),
        ("c2", 0.5),
        ("min_depth", -1),
        ("max_depth", 1.5),
        ("verify_budget", True),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TreeShapeConfig(), **{field: value})


def test_min_above_max_depth_rejected():
    with pytest.raises(ValueError, match="min_depth"):
        TreeShapeConfig(min_depth=5, max_depth=4)


def test_bad_request_count_and_budget():
    cfg = TreeShapeConfig.cpu_small()
    with pytest.raises(ValueError, match="num_requests"):
        cfg.shape(0)
    with pytest.raises(ValueError, match="verify_budget"):
        cfg.shape(3, verify_budget=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.c1 = 2  # type: ignore[misc]


def test_adaserve_shape_fits_the_engine():
    from adaserve_jax.scheduler.policy import ADASERVE_SHAPE, fit_adaserve_shape

    # the shipped engine (8 slots, 64 tokens) and the paper scale (128 slots, 1024): full tree
    assert fit_adaserve_shape(ADASERVE_SHAPE, 64, 8) == ADASERVE_SHAPE
    assert fit_adaserve_shape(ADASERVE_SHAPE, 1024, 128) == ADASERVE_SHAPE
    # 16 slots on 64 tokens: depth floor(64 / 16) - 1 = 3, width min(32 // 16, 1) = 1
    small = fit_adaserve_shape(ADASERVE_SHAPE, 64, 16)
    assert (small.depth, small.width) == (3, 1)
    wide = fit_adaserve_shape(dataclasses.replace(ADASERVE_SHAPE, depth=6, width=2), 64, 16)
    assert (wide.depth, wide.width) == (3, 2)
    # 32 slots: depth 1, width 1 (one drafted token per request)
    tiny = fit_adaserve_shape(ADASERVE_SHAPE, 64, 32)
    assert (tiny.depth, tiny.width) == (1, 1)
