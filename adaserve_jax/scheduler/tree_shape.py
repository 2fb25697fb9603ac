"""Adaptive speculation-tree shape (AdaServe paper §5.2).

With `n` running requests, a verify budget `B1` and a draft budget `B2` (tokens per step):

    depth d = clip(floor(B1 / (n + c1)) - 1, Dmin, Dmax)
    width w = clip(floor(B2 / n) + c2, 1, Wmax)

Light load gives deep, wide trees (each request may use a large share of the verify budget);
heavy load shrinks both so that drafting stays cheap and every request still gets its root.
`c1` discounts the verify budget for the roots and bonus tokens (a larger `c1` gives shallower
trees); `c2` biases the beam width. Depth 0 means no drafting (plain decoding).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class TreeShape(NamedTuple):
    """Draft expansion steps (`depth`) and beam width (`width`) for one iteration."""

    depth: int
    width: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class TreeShapeConfig:
    """Constants of the depth/width rule; see the module docstring.

    verify_budget: B1, tokens per verify step. draft_budget: B2, tokens per draft step.
    c1 >= 0, c2 any int. 0 <= min_depth <= max_depth. max_width >= 1.
    """

    verify_budget: int = 64
    draft_budget: int = 32
    c1: int = 1
    c2: int = 0
    min_depth: int = 1
    max_depth: int = 8
    max_width: int = 4

    def __post_init__(self) -> None:
        for name in ("verify_budget", "draft_budget", "max_width"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("c1", "min_depth", "max_depth"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not _is_int(self.c2):
            raise ValueError(f"c2={self.c2!r} must be an int")
        if self.min_depth > self.max_depth:
            raise ValueError(f"min_depth={self.min_depth} must be <= max_depth={self.max_depth}")

    @classmethod
    def cpu_small(cls) -> TreeShapeConfig:
        """Our CPU engine: verify steps are flat up to ~16-64 tokens, so modest trees."""
        return cls(verify_budget=64, draft_budget=32, c1=1, c2=0, min_depth=1, max_depth=6,
                   max_width=4)  # fmt: skip

    def shape(self, num_requests: int, verify_budget: int | None = None) -> TreeShape:
        """Tree shape for `num_requests >= 1` running requests.

        `verify_budget` overrides B1 (the budget rule evaluates several candidate budgets).
        """
        return tree_shape(self, num_requests, verify_budget)


def tree_shape(
    config: TreeShapeConfig, num_requests: int, verify_budget: int | None = None
) -> TreeShape:
    """(depth, width) for `num_requests` running requests; see the module docstring."""
    if not _is_int(num_requests) or num_requests < 1:
        raise ValueError(f"num_requests={num_requests!r} must be an int >= 1")
    b1 = config.verify_budget if verify_budget is None else verify_budget
    if not _is_int(b1) or b1 < 1:
        raise ValueError(f"verify_budget={b1!r} must be an int >= 1")
    depth = b1 // (num_requests + config.c1) - 1
    width = config.draft_budget // num_requests + config.c2
    return TreeShape(
        depth=min(max(depth, config.min_depth), config.max_depth),
        width=min(max(width, 1), config.max_width),
    )
