"""The decoding requests' fixed fields as arrays, rebuilt only when the set changes (numpy).

Every iteration the scheduler reads its decoding requests into arrays for the vectorized host
path (scheduler/loop.py). What a request carries unchanged while it decodes (its KV slot, limits,
SLO, sampling, first-token time) is read once per *roster* (the decoding requests, in order)
instead of once per iteration: at 64-96 running requests the roster stays the same for many
iterations, and each per-request read costs a pass over all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import SamplingParams
from adaserve_jax.scheduler.request import RequestState

NO_SLO_MS = 1e9  # requests without a TPOT SLO are never behind


def tpot_slo_s(reqs: Sequence[RequestState]) -> np.ndarray:
    """f64[n]: each request's TPOT SLO in seconds (NO_SLO_MS when it has none)."""
    return np.array([(r.request.tpot_slo_ms or NO_SLO_MS) / 1e3 for r in reqs], np.float64)


@dataclasses.dataclass(frozen=True, slots=True)
class Roster:
    """Fixed fields of the decoding requests `reqs`, one entry per request, in order.

    slots: KV slot (list and i64 array); sampling: SamplingParams; prompt_len: prompt tokens;
    max_tokens: i64; tpot_slo_s: f64 TPOT target in seconds (NO_SLO_MS when none);
    first_token: f64 first-token time, 0.0 where unset or 0.0 (see `elapsed`);
    has_stop: bool, the request has stop strings; tightest_slo_s: min of tpot_slo_s.
    """

    reqs: list[RequestState]
    slots_l: list[int]
    slots: np.ndarray
    sampling: list[SamplingParams]
    prompt_len: list[int]
    max_tokens: np.ndarray
    tpot_slo_s: np.ndarray
    first_token: np.ndarray
    has_first: np.ndarray
    has_stop: np.ndarray
    tightest_slo_s: float

    @classmethod
    def build(cls, reqs: Sequence[RequestState]) -> Roster:
        slots_l = [r.slot for r in reqs]
        first = [r.first_token_time for r in reqs]
        slos = tpot_slo_s(reqs)
        return cls(
            reqs=list(reqs),
            slots_l=slots_l,
            slots=np.array(slots_l, np.int64),
            sampling=[r.request.sampling for r in reqs],
            prompt_len=[len(r.request.prompt_ids) for r in reqs],
            max_tokens=np.array([r.request.max_tokens for r in reqs], np.int64),
            tpot_slo_s=slos,
            first_token=np.array([t or 0.0 for t in first], np.float64),
            has_first=np.array([bool(t) for t in first], bool),
            has_stop=np.array([bool(r.request.stop) for r in reqs], bool),
            tightest_slo_s=float(slos.min()) if len(reqs) else math.inf,
        )

    def matches(self, reqs: list[RequestState]) -> bool:
        """The same requests in the same order (list equality: identical objects compare
        equal without a field comparison; distinct but equal states hold equal fields), all
        with their first token (a request's first-token time never changes once set)."""
        return self.reqs == reqs and bool(self.has_first.all())

    def elapsed(self, now: float) -> np.ndarray:
        """f64 seconds since each request's first token (0.0 where it has none yet)."""
        return np.where(self.has_first, now - self.first_token, 0.0)
