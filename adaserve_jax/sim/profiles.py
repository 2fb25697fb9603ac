"""Latency profiles of the simulated engine (numpy only).

A profile is a JSON file:

    {"name": str, "description": str,
     "verify_ms": {"<tokens>": ms, ...},   # target verify/prefill step, strictly increasing
                                           # token counts, non-decreasing latencies
     "draft_ms": {"<tokens>": ms, ...},    # one draft step (optional; absent = free drafting)
     "expand_ms": {"<d>,<w>,<k>": {"<rows>": ms, ...}, ...},
                                           # one draft expansion call of that tree shape over a
                                           # row bucket (optional; measured by
                                           # engine/profiler.py; a call pays for the smallest
                                           # bucket >= its requests; absent shapes cost
                                           # depth - 1 draft steps)
     "baseline_tpot_ms": float,            # single-request autoregressive TPOT (SLO scale)
     "pad_to_buckets": bool,               # true: a step costs the smallest bucket >= its
                                           # tokens (the real engine pads to compiled buckets);
                                           # false: linear interpolation between points
     "expand_rows": "active" | "all",      # without expand_ms: rows a draft expansion step
                                           # pays for, the running requests or every KV slot
                                           # (the real JAX engine expanded every slot until
                                           # 2026-11-24; it now expands a row bucket)
     "host_ms": float}                     # fixed host cost added to every iteration

Shipped profiles live in `profiles/<name>.json`: `paper-llama70b` (the AdaServe paper's
Llama-3.1-70B on 4xA100) and `local` (the shipped checkpoint pair measured on this machine by
`adaserve_jax.engine.profiler`). Past the last point a curve continues with its last slope.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from adaserve_jax.scheduler.budget import LatencyCurve, LatencyProfile

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A missing, unknown or malformed profile; the message names the file and the field."""


@dataclasses.dataclass(frozen=True, slots=True)
class SimProfile:
    name: str
    verify: LatencyCurve
    draft: LatencyCurve | None
    baseline_tpot_ms: float
    pad_to_buckets: bool = False
    expand_rows: str = "active"
    host_ms: float = 0.0
    expand_ms: dict | None = None  # {(depth, width, topk): ((rows, ...), (ms, ...))}
    description: str = ""
    source: str = ""  # file it was read from
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.baseline_tpot_ms) and self.baseline_tpot_ms > 0):
            raise ValueError(f"baseline_tpot_ms={self.baseline_tpot_ms} must be finite and > 0")
        if self.expand_rows not in ("active", "all"):
            raise ValueError(f"expand_rows={self.expand_rows!r} must be 'active' or 'all'")
        if not (math.isfinite(self.host_ms) and self.host_ms >= 0):
            raise ValueError(f"host_ms={self.host_ms} must be finite and >= 0")

    def _price(self, curve: LatencyCurve, tokens: int) -> float:
        key = (curve is self.verify, tokens)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = self._price_uncached(curve, tokens)
        return ms

    def _price_uncached(self, curve: LatencyCurve, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        if self.pad_to_buckets:
            i = int(np.searchsorted(curve.tokens, tokens))
            if i < len(curve.tokens):
                return curve.ms[i]
        return float(curve.latency_ms(tokens))

    def verify_ms(self, tokens: int) -> float:
        """Latency of one target step carrying `tokens` tokens (prefill chunks + trees)."""
        return self._price(self.verify, tokens)

    def draft_ms(self, tokens: int) -> float:
        """Latency of one draft step carrying `tokens` tokens (0 without a draft table)."""
        return 0.0 if self.draft is None else self._price(self.draft, tokens)

    def expand_call_ms(self, shape, active: int, tokens: int) -> float:
        """One expansion call growing `shape` trees for `active` requests: the measured call
        of the smallest row bucket >= `active` (the largest past it) when the profile has
        this shape, else `depth - 1` draft steps over `tokens` (rows x width) tokens."""
        measured = self.latency_profile().expand_call_ms(shape, active)
        return (shape.depth - 1) * self.draft_ms(tokens) if measured is None else measured

    def latency_profile(self) -> LatencyProfile:
        """The scheduler's budget-rule profile (the same tables the real engine would hand it;
        built once)."""
        prof = self._cache.get("latency_profile")
        if prof is None:
            expand = tuple(
                (shape, tuple(rows), tuple(ms))
                for shape, (rows, ms) in sorted((self.expand_ms or {}).items())
            )
            prof = LatencyProfile(self.verify, self.draft, self.host_ms, expand)
            self._cache["latency_profile"] = prof
        return prof


def _ms_table(path, label: str, table, key_kind: str) -> dict[int, float]:
    """A {count: ms} object -> {int >= 1: float >= 0}; ProfileError naming the file and the
    field (`label`) otherwise."""
    if not isinstance(table, dict) or not table:
        raise ProfileError(f"{path}: field {label} must be a non-empty {{{key_kind}: ms}} object")
    parsed = {}
    for key, ms in table.items():
        try:
            n = int(key)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ProfileError(f"{path}: field {label}: key {key!r} is not a {key_kind} count")
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not ms >= 0:
            raise ProfileError(f"{path}: field {label}[{key!r}] = {ms!r} is not a number >= 0")
        parsed[n] = float(ms)
    return parsed


def _curve(path, data: dict, field: str) -> LatencyCurve:
    parsed = _ms_table(path, repr(field), data[field], "token")
    try:
        return LatencyCurve.from_dict(parsed)
    except ValueError as exc:
        raise ProfileError(f"{path}: field {field!r}: {exc}") from None


def _expand_table(path, table) -> dict:
    """{"d,w,k": {"rows": ms}} -> {(d, w, k): (rows, ms)} sorted by rows; ProfileError naming
    the field and the entry."""
    field = "expand_ms"
    if not isinstance(table, dict):
        raise ProfileError(f'{path}: field {field!r} must be an object {{"d,w,k": {{rows: ms}}}}')
    out = {}
    for key, rows in table.items():
        try:
            shape = tuple(int(x) for x in str(key).split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ProfileError(f"{path}: field {field!r}: key {key!r} is not 'depth,width,topk'")
        parsed = _ms_table(path, f"{field!r}[{key!r}]", rows, "row")
        order = sorted(parsed)
        out[shape] = (tuple(order), tuple(parsed[n] for n in order))
    return out


def load_profile_file(path: str | Path) -> SimProfile:
    """Read and validate a profile JSON; ProfileError naming the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from None
    return parse_profile(data, path)


def parse_profile(data, path: str | Path = "<profile>") -> SimProfile:
    """Validate a profile's JSON object (`path` names it in errors; a file's path, or where
    the object came from); ProfileError naming the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for field in ("verify_ms", "baseline_tpot_ms"):
        if field not in data:
            raise ProfileError(f"{path}: missing field {field!r}")
    verify = _curve(path, data, "verify_ms")
    draft = _curve(path, data, "draft_ms") if data.get("draft_ms") is not None else None
    kwargs = {}
    if data.get("expand_ms") is not None:
        kwargs["expand_ms"] = _expand_table(path, data["expand_ms"])
    for field, kind in (
        ("baseline_tpot_ms", float),
        ("host_ms", float),
        ("pad_to_buckets", bool),
        ("expand_rows", str),
    ):
        if field not in data:
            continue
        v = data[field]
        ok = isinstance(v, bool) if kind is bool else isinstance(v, kind)
        if kind is float:
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        if not ok:
            raise ProfileError(f"{path}: field {field!r} = {v!r} must be a {kind.__name__}")
        kwargs[field] = kind(v)
    try:
        return SimProfile(
            name=str(data.get("name", Path(str(path)).stem)),
            verify=verify,
            draft=draft,
            description=str(data.get("description", "")),
            source=str(path),
            **kwargs,
        )
    except ValueError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> SimProfile:
    """A shipped profile by name (`paper-llama70b`, `local`) or a JSON file by path."""
    text = str(name_or_path)
    if text.endswith(".json") or "/" in text:
        return load_profile_file(text)
    path = PROFILE_DIR / f"{text}.json"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {text!r}; shipped profiles: {', '.join(available_profiles())} "
            f"(or pass a path to a profile JSON)"
        )
    return load_profile_file(path)


def profile_from_engine_cache(path: str | Path, **meta) -> dict:
    """A sim profile dict from the real profiler's cache file (engine/profiler.py `Profile`)."""
    data = json.loads(Path(path).read_text())
    out = {
        "name": meta.pop("name", "local"),
        "description": meta.pop("description", ""),
        "verify_ms": data["verify_ms"],
        "draft_ms": data.get("draft_ms"),
        "expand_ms": data.get("expand_ms"),
        "baseline_tpot_ms": data["baseline_tpot_ms"],
        "pad_to_buckets": True,
        "expand_rows": "all",
        "host_ms": 0.0,
    }
    out.update(meta)
    return out
