"""SLO pacing inside the scheduler's iteration (numpy only): when it applies, the paced
plain step, the prompt gate and the exploration check, on top of scheduler/pacing.py.

`PacedSteps` is a part of `Scheduler` (scheduler/loop.py), kept in its own file: its methods
read the scheduler's state (profile, policy, token budget, engine, clock) and are called from
`Scheduler.step` and `Scheduler._skip_drafting`.
"""

from __future__ import annotations

import time

import numpy as np

from adaserve_jax.scheduler.pacing import (
    StepTimes,
    gate_prompts_trusted,
    pace_step_trusted,
    step_caps,
)
from adaserve_jax.scheduler.policy import PolicyKind
from adaserve_jax.scheduler.request import RequestState
from adaserve_jax.scheduler.roster import tpot_slo_s


class PacedSteps:
    """SLO pacing for `Scheduler` (see the module docstring)."""

    def _pacing_applies(self) -> bool:
        """AdaServe with a profile on which batching slows the step: a second token costs more
        than 5% over a lone token's step (this CPU: 5.4 vs 4.0 ms). On a flat profile (a GPU
        below its knee; the paper's 70B profile: 30 ms, 30.2 ms) every request rides in every
        step and every prompt is prefilled as the budget allows, as without pacing."""
        if self._pacing_on is None:
            self._pacing_on = False
            if self.slo_pacing and self.profile is not None and self.token_budget >= 2:
                if self.policy.kind is PolicyKind.ADASERVE:
                    step = self._step_times().seconds()
                    self._pacing_on = bool(step[2] > 1.05 * step[1])
        return self._pacing_on

    def _pace(
        self, decode: list[RequestState], prefilling: list[RequestState]
    ) -> tuple[list[RequestState], list[RequestState], int]:
        """SLO pacing of a plain-decoding step (scheduler/pacing.py): the decoding requests in
        it, the prompts that may be prefilled, and the step's token limit. Prompts of requests
        with a TTFT SLO and the prefill floor are never held back."""
        if len(decode) == 1 and not prefilling:
            decode[0].skipped = 0
            return decode, prefilling, self.token_budget  # nothing to choose
        t0 = time.perf_counter()
        slo, slack, remaining = self._slack(decode)
        step_s = self._step_times().seconds()
        skipped = np.array([r.skipped for r in decode], np.int64)
        choice = pace_step_trusted(slack, slo, remaining, skipped, step_s, max_skips=self.max_skips)
        # (the gate never holds back a prompt with a TTFT SLO, so the floor is known before it)
        floor = max(self.prefill_floor, self._ttft_prompt_tokens(prefilling))
        limit = max(choice.max_tokens, int(choice.include.sum()) + floor)
        if limit > choice.include.sum():  # else no prompt token fits this step: no gate
            # without forced requests the gate's own baseline is this very choice
            base = None if (skipped >= self.max_skips).any() else choice.on_track
            prefilling = self._gate_prompts(prefilling, slo, slack, remaining, base)
        kept = []
        for r, keep in zip(decode, choice.include.tolist(), strict=True):
            if keep:
                r.skipped = 0
                kept.append(r)
            else:
                r.skipped += 1
        self._select_seconds += time.perf_counter() - t0
        return kept, prefilling, limit

    def _gate_prompts(
        self,
        prefilling: list[RequestState],
        slo: np.ndarray,
        slack: np.ndarray,
        remaining: np.ndarray,
        base_on_track: int | None = None,
    ) -> list[RequestState]:
        """The prompts that may be prefilled now (pacing.py `gate_prompts`), given the decoding
        requests' TPOT SLOs, slack and remaining tokens (and, when known, how many of them the
        pacing choice keeps on track without forced requests); prompts of requests with a TTFT
        SLO always may."""
        gated = [r for r in prefilling if r.request.ttft_slo_ms is None]
        if not gated:
            return prefilling
        ok = gate_prompts_trusted(
            slack,
            slo,
            remaining,
            self._step_times().seconds(),
            tpot_slo_s(gated),
            np.array([r.request.max_tokens for r in gated], np.int64),
            base_on_track=base_on_track,
        )
        let_in = {id(r) for r, keep in zip(gated, ok.tolist(), strict=True) if keep}
        return [r for r in prefilling if r.request.ttft_slo_ms is not None or id(r) in let_in]

    def _step_times(self) -> StepTimes:
        if self._times is None:
            padded = bool(getattr(self.engine, "pads_to_buckets", True))
            self._times = StepTimes(self.profile, self.token_budget, padded=padded)
        return self._times

    def _slack(self, decode: list[RequestState]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TPOT SLO s, slack s, tokens remaining) of the decoding requests (pacing.py); once
        per iteration (the exploration check and pacing both ask, for the same requests)."""
        memo = self._slack_memo
        if memo is not None and memo[0] == self.iterations and memo[1] is decode:
            return memo[2]
        roster = self._roster_of(decode)
        out_len = np.array([len(r.output) for r in decode], np.int64)
        slo = roster.tpot_slo_s
        slack = np.maximum(out_len - 1, 0) * slo - roster.elapsed(self.clock())
        out = slo, slack, roster.max_tokens - out_len
        self._slack_memo = (self.iterations, decode, out)
        return out

    def _exploration_affordable(self, decode: list[RequestState]) -> bool:
        """With SLO pacing: a speculative exploration waits until every request that can still
        attain its SLO has the slack to absorb it. It is priced at its most: every request's
        whole candidate chain verified (1 + depth tokens each), the draft's catch-up step over
        its backlog and its expansion (the profile's measured call, else depth - 1 draft
        steps). (Priced at 2 tokens a request it cost a lone 1.2x request its SLO: a 15.7 ms
        exploration among 4.3 ms steps.)"""
        if not self._pacing_applies() or self.policy.shape is None:
            return True
        slo, slack, remaining = self._slack(decode)
        cap = step_caps(slack, slo, remaining)
        step_s = self._step_times().seconds()
        n, depth = len(decode), self.policy.shape.depth
        est = float(step_s[min(n * (1 + depth), self.token_budget)])
        if self.profile.draft is not None:
            lag = self._draft_backlog(decode)
            draft = self.profile.draft.latency_ms
            expand = self.profile.expand_call_ms(self.policy.shape, n)
            if expand is None:
                expand = (depth - 1) * draft(n)
            est += (draft(max(lag, n)) + expand) / 1e3
        live = cap >= step_s[1]
        return bool(np.all(cap[live] >= est))

    def _catch_up_affordable(self, decode: list[RequestState], tokens: int) -> bool:
        """With SLO pacing: a draft step over `tokens` of the backlog beside a plain step waits,
        like an exploration, until every request that can still attain its SLO has the slack
        to absorb it."""
        if not self._pacing_applies() or self.profile.draft is None:
            return True
        slo, slack, remaining = self._slack(decode)
        cap = step_caps(slack, slo, remaining)
        step_s = self._step_times().seconds()
        est = float(step_s[len(decode)]) + float(self.profile.draft.latency_ms(tokens)) / 1e3
        live = cap >= step_s[1]
        return bool(np.all(cap[live] >= est))
