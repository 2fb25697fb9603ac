"""Speculation trees on the host (numpy only): shapes, drafted trees, the acceptance walk.

`accept_path` is the lossless acceptance walk (DESIGN.md §1): starting at the
root, the target's own token at a node (greedy argmax, or a draw keyed by
(seed, position)) is compared with the node's drafted children; a match
descends, a miss ends the walk, and the target's token is emitted either way.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


def tree_size(depth: int, width: int, topk: int) -> int:
    """Nodes of a drafted tree: root + k depth-1 candidates + w*k per further depth."""
    return 1 + topk + (depth - 1) * width * topk


@dataclasses.dataclass(frozen=True, slots=True)
class TreeShape:
    depth: int
    width: int
    topk: int

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1 or self.topk < self.width:
            raise ValueError(f"invalid tree shape {self}: need depth >= 1, 1 <= width <= topk")

    @property
    def num_nodes(self) -> int:
        return tree_size(self.depth, self.width, self.topk)


@dataclasses.dataclass(frozen=True, slots=True)
class DraftTrees:
    """Candidate trees for all slots: tokens/parents i32[S, N], log_f f32[S, N], depth i32[S, N].

    in_cache bool[S, N] (optional): nodes whose draft K/V the draft cache already holds at
    the row they take if accepted (`ctx + depth`), so the draft's catch-up may skip an
    accepted path's leading run of them. None: every accepted token is caught up.

    rank i32[N] (optional): each column's rank among its siblings (0 = the draft's top
    child), the same in every tree: the engines lay a frontier node's `topk` children out
    consecutively in the draft's order (`layout_ranks`). None: derive it from `parents`.
    """

    tokens: np.ndarray
    parents: np.ndarray
    log_f: np.ndarray
    depth: np.ndarray
    in_cache: np.ndarray | None = None
    rank: np.ndarray | None = None


@functools.lru_cache(maxsize=32)
def layout_ranks(num_nodes: int, topk: int) -> np.ndarray:
    """Read-only i32[num_nodes]: the sibling rank of every column of a drafted tree whose
    nodes are laid out as the expansion lays them out (root 0; the root's `topk` children
    1..topk; then per depth, frontier node p's children at `first + p * topk + rank`), i.e.
    `(j - 1) % topk` for j >= 1 and 0 for the root."""
    out = (np.arange(-1, num_nodes - 1) % topk).astype(np.int32)
    out[0] = 0
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=32)
def layout_depths(num_nodes: int, width: int, topk: int) -> np.ndarray:
    """Read-only i32[num_nodes]: the depth of every column of a drafted tree laid out as
    `layout_ranks` describes (root 0, columns 1..topk depth 1, then `width * topk` columns
    per further depth)."""
    j = np.arange(num_nodes)
    out = np.where(j == 0, 0, 2 + np.maximum(j - 1 - topk, -1) // (width * topk)).astype(np.int32)
    out.flags.writeable = False
    return out


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """i32[..., N] node depths from parents (parents[..., i] < i, root -1)."""
    depth = np.zeros(parents.shape, np.int32)
    for i in range(1, parents.shape[-1]):
        depth[..., i] = (
            np.take_along_axis(depth, np.maximum(parents[..., i : i + 1], 0), -1)[..., 0] + 1
        )
    return depth


def accept_path(
    parents: np.ndarray, tokens: np.ndarray, target_tokens: np.ndarray
) -> tuple[list[int], list[int]]:
    """Acceptance walk over one verified tree.

    parents/tokens i32[n] (node 0 = root), target_tokens i32[n] = the target's token
    produced at each node. Returns (accepted node indices after the root, emitted tokens):
    the emitted tokens are the accepted nodes' tokens followed by the bonus token.
    """
    children: dict[int, list[int]] = {}
    for i in range(1, len(parents)):
        children.setdefault(int(parents[i]), []).append(i)
    node, path, emitted = 0, [], []
    while True:
        want = int(target_tokens[node])
        emitted.append(want)
        nxt = next((c for c in children.get(node, ()) if int(tokens[c]) == want), None)
        if nxt is None:
            return path, emitted
        path.append(nxt)
        node = nxt


def accept_paths(
    parents: np.ndarray, tokens: np.ndarray, target_tokens: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """`accept_path` for many trees at once (numpy, one pass per tree level).

    parents/tokens/target_tokens i32[R, n] (row r's nodes [0, lengths[r]); the rest padding;
    parents[r, i] < i, root -1). Returns bool[R, n]: the accepted nodes, root included. A
    node is accepted when its parent is and its token is the target's token at the parent;
    siblings hold distinct tokens (top-k children), so the accepted nodes form one path, and
    with parents before children its nodes are in increasing index order.
    """
    r, n = parents.shape
    valid = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    par = np.maximum(parents, 0)
    rows = np.arange(r)[:, None]
    match = valid & (tokens == target_tokens[rows, par])
    match[:, 0] = True
    acc = np.zeros((r, n), bool)
    acc[:, 0] = True
    for _ in range(n - 1):  # each pass extends every path by one level
        nxt = match & acc[rows, par]
        nxt[:, 0] = True
        if np.array_equal(nxt, acc):
            break
        acc = nxt
    return acc


def accept_nodes(up: np.ndarray, match: np.ndarray) -> np.ndarray:
    """The acceptance walk over many trees laid out flat (numpy, pointer doubling).

    up i64[K]: each node's parent as a flat index (a root: itself); match bool[K]: the node's
    token is the target's token at its parent (roots: True). Returns bool[K]: accepted, i.e.
    the node and all its ancestors match. `accept_paths` on the padded layout gives the same
    nodes; here ceil(log2(depth)) + 1 passes suffice, whatever the trees' widths.
    """
    ok = np.asarray(match, bool).copy()
    anc = np.asarray(up)
    while True:  # ok[j]: j and its nearest 2^t - 1 ancestors match; anc[j]: its 2^t-th ancestor
        ok &= ok[anc]
        nxt = anc[anc]
        if np.array_equal(nxt, anc):  # every node's ancestor pointer reached its root
            return ok
        anc = nxt
