"""Acceptance model of the simulated engine, calibrated on the real draft/target pair.

What the simulator needs from the real pair, and how `calibrate.py` records it from
instrumented real runs (policy `tree:D,K`, greedy):

- **Draft confidence.** For every tree node the draft expanded, the conditional
  probabilities `q_1 >= ... >= q_K` of its top-K children (`exp(log_f(child) - log_f(node))`),
  grouped by the children's depth. The simulator resamples these rows, so `f(v)` in the
  simulated trees has the real draft's distribution.
- **Confidence calibration.** For every node on the accepted path of a real verify step
  (the root included) and each of its drafted children (rank r = 1..K by draft probability):
  did the target's token at that node equal the child's token? Counted per rank and per
  bin of `q`. `match_prob(q, r)` is the smoothed per-bin rate (a few pseudo-counts pulled
  toward `q`, i.e. toward a perfectly calibrated draft, so sparse bins stay sane). The
  simulator draws the target's token from these probabilities, so `f(v)` stays an
  *estimate* of acceptance, exactly as in the real engine.
- **Per-depth calibration.** The same counts split by the child's depth (`match_by_depth`):
  the rate at depth d is conditional on the walk having reached depth d - 1, which carries the
  path correlation of real text (a walk that survived depth 2 is in an "easy" stretch). Each
  depth's table is shrunk toward the pooled one with a few pseudo-counts.
- **Per-depth acceptance** of the real walks (depth d reached / depth d-1 reached), for
  checking the simulator against the real pair (SIMULATION.md).
- **Streaks** (optional field `streak`). Real text comes in stretches that are easy or hard
  for the draft: a request's draft confidence at its tree root is correlated between
  consecutive verify steps. The recorder ranks every step's root confidence (its top child's
  q) among all of them and measures the rank correlation `step_corr` between a request's
  consecutive steps, `mean_gap_tokens` tokens apart on average, and fits `rho_per_token`, the
  rho whose mean `rho ** gap` over those pairs equals `step_corr` (`calibrate.py --streak`
  stores it; the shipped file has none). The simulator gives every slot a latent quantile
  that it keeps from one draft step to the next with probability `rho_per_token ** tokens
  advanced` and redraws otherwise, and picks the root's confidence row at that quantile of
  the depth-1 samples (ordered by their top q), so an easy stretch stays easy for a while.
  Without the field (or rho 0) every step draws its root row afresh, as before.

The file (`calibration.json`) is validated on load; errors name the file and the field.
Ranks beyond K never match; their `q` decays geometrically from `q_K` (documented
extrapolation for policies with wider trees than the calibration run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"
PSEUDO_COUNTS = 4.0  # prior weight toward a perfectly calibrated draft in every bin
EXTRA_RANK_DECAY = 0.5  # q_{K+i} = q_K * decay**i for ranks past the calibrated K


class CalibrationError(ValueError):
    """A missing or malformed calibration file; the message names the file and the field."""


@dataclasses.dataclass(frozen=True, slots=True)
class Calibration:
    """bins f64[B+1] edges over [0, 1]; matched/count f64[K, B] per rank and bin;
    confidence: depth (1-based) -> f32[M, K] sampled top-K conditional probabilities;
    per_depth: depth -> (reached, accepted)."""

    bins: np.ndarray
    matched: np.ndarray
    count: np.ndarray
    confidence: dict[int, np.ndarray]
    per_depth: dict[int, tuple[int, int]]
    source: dict = dataclasses.field(default_factory=dict)
    path: str = ""
    by_depth: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    streak: dict = dataclasses.field(default_factory=dict)  # see the module docstring
    _table: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    _by_ease: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        b = np.asarray(self.bins, np.float64)
        if b.ndim != 1 or b.size < 2 or b[0] != 0.0 or b[-1] != 1.0 or np.any(np.diff(b) <= 0):
            raise ValueError(f"bins={b.tolist()} must increase strictly from 0 to 1")
        if self.matched.shape != self.count.shape or self.count.shape[1] != b.size - 1:
            raise ValueError(
                f"matched {self.matched.shape} and count {self.count.shape} must both be "
                f"[topk, {b.size - 1}]"
            )
        if np.any(self.count < 0) or np.any(self.matched < 0) or np.any(self.matched > self.count):
            raise ValueError("need 0 <= matched <= count in every bin")
        if not self.confidence or 1 not in self.confidence:
            raise ValueError("confidence must hold samples for depth 1")
        k = self.count.shape[0]
        for d, rows in self.confidence.items():
            if rows.ndim != 2 or rows.shape[1] != k or rows.shape[0] == 0:
                raise ValueError(f"confidence[{d}] has shape {rows.shape}, expected [M>0, {k}]")
            if np.any(rows < 0) or np.any(rows > 1) or np.any(rows.sum(1) > 1 + 1e-3):
                raise ValueError(f"confidence[{d}]: probabilities must be in [0, 1], sum <= 1")
            if np.any(np.diff(rows, axis=1) > 1e-6):
                raise ValueError(f"confidence[{d}]: each row must be sorted descending")
        for d, (m, c) in self.by_depth.items():
            if m.shape != self.count.shape or c.shape != self.count.shape:
                raise ValueError(f"by_depth[{d}] tables must have shape {self.count.shape}")
            if np.any(c < 0) or np.any(m < 0) or np.any(m > c):
                raise ValueError(f"by_depth[{d}]: need 0 <= matched <= count in every bin")
        rho = self.streak.get("rho_per_token", 0.0)
        if not (isinstance(rho, int | float) and 0.0 <= rho < 1.0):
            raise ValueError(f"streak.rho_per_token={rho!r} must be a number in [0, 1)")
        rows1 = self.confidence[1]
        object.__setattr__(self, "_by_ease", rows1[np.argsort(rows1[:, 0], kind="stable")])
        mid = 0.5 * (b[1:] + b[:-1])
        pooled = (self.matched + PSEUDO_COUNTS * mid) / (self.count + PSEUDO_COUNTS)  # [K, B]
        # per child depth (index 0 = any depth without its own table), shrunk to the pooled rate;
        # rank >= K never matches: an extra all-zero row
        depths = max(self.by_depth, default=0)
        table = np.zeros((depths + 1, k + 1, mid.size))
        table[:, :k] = pooled
        for d, (m, c) in self.by_depth.items():
            table[d, :k] = (m + PSEUDO_COUNTS * pooled) / (c + PSEUDO_COUNTS)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "bins", b)

    @property
    def topk(self) -> int:
        return int(self.count.shape[0])

    @property
    def max_depth(self) -> int:
        return max(self.confidence)

    def match_table(self) -> np.ndarray:
        """f64[K, B]: smoothed P(target token == rank-r child | q in bin)."""
        return self._table[0, :-1]

    def match_prob(self, q: np.ndarray, rank: np.ndarray, depth: int = 0) -> np.ndarray:
        """P(child matches the target | its draft probability q, its 0-based rank, and the
        child's depth when the calibration has per-depth tables; the parent was reached)."""
        table = self._table[depth if depth < self._table.shape[0] else -1]
        nb = table.shape[1]
        b = np.searchsorted(self.bins, q, side="right") - 1
        np.clip(b, 0, nb - 1, out=b)
        return table[np.minimum(rank, self.topk), b]

    def sample_confidence(self, rng: np.random.Generator, depth: int, n: int, k: int) -> np.ndarray:
        """f32[n, k] draft top-k conditional probabilities of n nodes' children at `depth`."""
        known = depth if depth in self.confidence else max(d for d in self.confidence if d <= depth)
        rows = self.confidence[known]
        return self._widen(rows[rng.integers(0, rows.shape[0], size=n)], k)

    @property
    def streak_rho(self) -> float:
        """Per-token probability that a slot's draft ease carries over (0: no streaks)."""
        return float(self.streak.get("rho_per_token", 0.0))

    def confidence_at(self, ease: np.ndarray, k: int) -> np.ndarray:
        """f32[n, k] root (depth-1) confidence rows at quantiles `ease` f64[n] in [0, 1) of
        the depth-1 samples ordered by their top probability (streaks; module docstring)."""
        rows = self._by_ease
        pick = rows[np.minimum((ease * rows.shape[0]).astype(np.int64), rows.shape[0] - 1)]
        return self._widen(pick, k)

    def _widen(self, pick: np.ndarray, k: int) -> np.ndarray:
        """The first k columns of sampled rows; ranks past the calibrated K extrapolated."""
        if k <= self.topk:
            return pick[:, :k]
        extra = pick[:, -1:] * EXTRA_RANK_DECAY ** np.arange(1, k - self.topk + 1)
        return np.concatenate([pick, extra.astype(np.float32)], axis=1)

    def per_depth_rate(self) -> dict[int, float]:
        return {d: (a / r if r else float("nan")) for d, (r, a) in sorted(self.per_depth.items())}

    # ---- JSON -----------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "topk": self.topk,
            "bins": [float(x) for x in self.bins],
            "match": {
                str(r + 1): {
                    "matched": self.matched[r].astype(int).tolist(),
                    "count": self.count[r].astype(int).tolist(),
                }
                for r in range(self.topk)
            },
            "match_by_depth": {
                str(d): {
                    str(r + 1): {
                        "matched": m[r].astype(int).tolist(),
                        "count": c[r].astype(int).tolist(),
                    }
                    for r in range(self.topk)
                }
                for d, (m, c) in sorted(self.by_depth.items())
            },
            "per_depth": {
                str(d): {"reached": int(r), "accepted": int(a)}
                for d, (r, a) in sorted(self.per_depth.items())
            },
            "confidence": {
                str(d): np.round(rows.astype(np.float64), 4).tolist()
                for d, rows in sorted(self.confidence.items())
            },
            "source": self.source,
            **({"streak": self.streak} if self.streak else {}),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json_dict(), separators=(",", ":")) + "\n")
        return path


def _field(path: Path, data: dict, name: str, kind: type):
    if name not in data:
        raise CalibrationError(f"{path}: missing field {name!r}")
    v = data[name]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise CalibrationError(f"{path}: field {name!r} must be a {kind.__name__}, got {v!r}")
    return v


def load_calibration(path: str | Path | None = None) -> Calibration:
    """Read and validate a calibration JSON (default: the shipped `calibration.json`)."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a JSON object, got {type(data).__name__}")
    topk = _field(path, data, "topk", int)
    bins = _field(path, data, "bins", list)
    match = _field(path, data, "match", dict)
    conf = _field(path, data, "confidence", dict)
    per_depth = _field(path, data, "per_depth", dict)
    try:
        matched = np.array([match[str(r + 1)]["matched"] for r in range(topk)], np.float64)
        count = np.array([match[str(r + 1)]["count"] for r in range(topk)], np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(
            f"{path}: field 'match' needs ranks 1..{topk}, each with equal-length "
            f"'matched' and 'count' lists ({exc!r})"
        ) from None
    by_depth = {}
    try:
        for d, tables in (data.get("match_by_depth") or {}).items():
            by_depth[int(d)] = tuple(
                np.array([tables[str(r + 1)][f] for r in range(topk)], np.float64)
                for f in ("matched", "count")
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CalibrationError(
            f"{path}: field 'match_by_depth' needs, per depth, ranks 1..{topk} with "
            f"'matched' and 'count' lists ({exc!r})"
        ) from None
    try:
        confidence = {int(d): np.array(rows, np.float32) for d, rows in conf.items()}
        depths = {int(d): (int(v["reached"]), int(v["accepted"])) for d, v in per_depth.items()}
        bins_arr = np.array(bins, np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(
            f"{path}: field 'confidence' or 'per_depth' malformed ({exc!r})"
        ) from None
    streak = data.get("streak", {})
    if not isinstance(streak, dict):
        raise CalibrationError(f"{path}: field 'streak' must be an object, got {streak!r}")
    try:
        return Calibration(
            bins_arr, matched, count, confidence, depths, data.get("source", {}), str(path),
            by_depth, streak,
        )  # fmt: skip
    except ValueError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def empty_counts(topk: int, num_bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bins, matched, count) zero tables for a recorder."""
    return (
        np.linspace(0.0, 1.0, num_bins + 1),
        np.zeros((topk, num_bins)),
        np.zeros((topk, num_bins)),
    )


def expected_chain_acceptance(cal: Calibration, depth: int, samples: int = 20000) -> list[float]:
    """Monte-Carlo P(accept depth d | reached d-1) for a chain (spec:N) under `cal`."""
    rng = np.random.default_rng(0)
    out = []
    for d in range(1, depth + 1):
        q = cal.sample_confidence(rng, d, samples, 1)[:, 0]
        out.append(float(cal.match_prob(q, np.zeros(samples, int), d).mean()))
    return out
