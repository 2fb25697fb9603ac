"""Scheduling policies behind one interface (numpy only).

autoregressive   vLLM-style continuous batching: one token per request per step,
                 waiting prompts prefilled whole (up to the largest token bucket)
sarathi          chunked prefill under a fixed per-step token budget, no speculation
spec:N           every request verifies a chain of N drafted tokens (vLLM-Spec(N))
tree:D,W         every request verifies a fixed beam tree of depth D, width W
                 (root + the top-W nodes of every depth; SpecInfer-like)
adaserve         SLO-customized selection from a drafted candidate tree
"""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np

from adaserve_jax.engine.tree import DraftTrees, TreeShape
from adaserve_jax.scheduler.tree_shape import TreeShapeConfig


class PolicyKind(enum.Enum):
    AUTOREGRESSIVE = "autoregressive"
    SARATHI = "sarathi"
    SPEC = "spec"
    TREE = "tree"
    ADASERVE = "adaserve"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    name: str
    kind: PolicyKind
    shape: TreeShape | None = None  # drafted candidate tree (speculative policies)

    @property
    def speculative(self) -> bool:
        return self.shape is not None


# AdaServe's drafted candidate tree: a depth-4 chain with the runner-up token at every depth
# (width 1, top-2 children). Deeper / wider trees (depth 6, width 2 was the default until
# 2026-11-24) cost more drafting per step than their extra nodes return with a draft of the
# shipped pair's quality (SIMULATION.md).
ADASERVE_SHAPE = TreeShape(depth=4, width=1, topk=2)
# Tokens per decoding request that AdaServe keeps out of reach of chunked prefill, whether its
# trees use them or not: prompts are prefilled only while running requests leave room, so the
# number of requests decoding at once stays near token_budget / ADASERVE_RESERVE (admission
# control that protects TPOT SLOs at the cost of TTFT under overload; SIMULATION.md).
ADASERVE_RESERVE = 30
_SPEC = re.compile(r"spec:(\d+)$")
_TREE = re.compile(r"tree:(\d+),(\d+)$")


def fit_adaserve_shape(shape: TreeShape, token_budget: int, num_slots: int) -> TreeShape:
    """AdaServe's candidate tree for an engine with `num_slots` slots and a `token_budget`:
    the paper's §5.2 rule (scheduler/tree_shape.py) at the most running requests
    `n = num_slots`, with verify budget B1 = token_budget (c1 = 0, so every slot's draft
    catch-up chain of up to d + 1 accepted tokens fits one step) and draft budget
    B2 = token_budget / 2, clipped to `shape`'s depth and width. Fixed per engine, so the
    engine warms up exactly this shape (no compilation while serving)."""
    cfg = TreeShapeConfig(
        verify_budget=max(token_budget, 1),
        draft_budget=max(token_budget // 2, 1),
        c1=0,
        c2=0,
        min_depth=1,
        max_depth=shape.depth,
        max_width=shape.width,
    )
    fitted = cfg.shape(max(num_slots, 1))  # width <= shape.width <= shape.topk
    return dataclasses.replace(shape, depth=fitted.depth, width=fitted.width)


def parse_policy(name: str, *, adaserve_shape: TreeShape = ADASERVE_SHAPE) -> Policy:
    """Parse a policy name; ValueError for unknown names or bad shapes."""
    if not isinstance(name, str):
        raise ValueError(f"policy must be a str, got {type(name).__name__}")
    if name == "autoregressive":
        return Policy(name, PolicyKind.AUTOREGRESSIVE)
    if name == "sarathi":
        return Policy(name, PolicyKind.SARATHI)
    if name == "adaserve":
        return Policy(name, PolicyKind.ADASERVE, adaserve_shape)
    if m := _SPEC.match(name):
        n = int(m.group(1))
        if not 1 <= n <= 16:
            raise ValueError(f"policy {name!r}: N must be in [1, 16]")
        return Policy(name, PolicyKind.SPEC, TreeShape(n, 1, 1))
    if m := _TREE.match(name):
        d, w = int(m.group(1)), int(m.group(2))
        if not (1 <= d <= 16 and 1 <= w <= 8):
            raise ValueError(f"policy {name!r}: need 1 <= D <= 16 and 1 <= W <= 8")
        return Policy(name, PolicyKind.TREE, TreeShape(d, w, w))
    raise ValueError(
        f"unknown policy {name!r}; expected autoregressive, sarathi, spec:N, tree:D,W or adaserve"
    )


def fixed_selection(trees: DraftTrees, row: int, shape: TreeShape) -> np.ndarray:
    """Nodes a fixed policy verifies for slot `row`: root + top-`width` nodes of every depth.

    For a chain (width 1, topk 1) that is the whole chain. Ties go to the lower index,
    as `lax.top_k` breaks them in the expansion, so the picks are the expanded frontier.
    """
    depth = trees.depth[row]
    log_f = trees.log_f[row]
    picked = [np.array([0])]
    for d in range(1, shape.depth + 1):
        nodes = np.flatnonzero(depth == d)
        order = np.argsort(-log_f[nodes], kind="stable")[: shape.width]
        picked.append(np.sort(nodes[order]))
    return np.concatenate(picked)
