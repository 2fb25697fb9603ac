"""SLO pacing: exact small cases, optimality against brute force, the loop on a virtual clock."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mock_engine import MockEngine

from adaserve_jax.scheduler.budget import LatencyProfile
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.pacing import StepTimes, gate_prompts, pace_step
from adaserve_jax.scheduler.request import Request

# step seconds by tokens carried (index = tokens), shaped like this CPU's buckets 1, 2, 4, 8
STEEP = np.array([0.0, 4.0, 5.4, 7.0, 7.0, 8.9, 8.9, 8.9, 8.9]) / 1e3


def _on_track(include, slack, cap, step) -> int:
    t = step[int(include.sum())]
    return int(((cap >= t) & include).sum() + ((cap >= 2 * t) & ~include).sum())


def test_a_tight_request_decodes_alone_while_loose_ones_have_slack():
    # coding: SLO 4.8 ms, no slack; two loose requests 20 ms ahead of theirs
    slo = np.array([4.8, 20.0, 20.0]) / 1e3
    slack = np.array([0.0, 20.0, 20.0]) / 1e3
    choice = pace_step(slack, slo, np.full(3, 50), np.zeros(3), STEEP)
    assert choice.include.tolist() == [True, False, False]
    assert choice.on_track == 3
    assert choice.max_tokens == 1  # a prompt token would make the 4.0 ms step 5.4 ms
    # two chat requests (SLO 6.7 ms) with no slack cannot sit out a 4.0 ms step; both fit a
    # 5.4 ms step, which the coding request cannot join: two on track beat one
    slo = np.array([4.8, 6.7, 6.7]) / 1e3
    choice = pace_step(np.zeros(3), slo, np.full(3, 50), np.zeros(3), STEEP)
    assert choice.include.tolist() == [False, True, True] and choice.on_track == 2
    assert choice.max_tokens == 2


def test_slack_is_spent_only_beyond_the_noise_reserve():
    slo, rem = np.array([4.8e-3]), np.array([10])
    # 10 tokens to go keep 10% x 4.8 ms x 10 = 4.8 ms of slack in reserve
    assert pace_step(np.array([4.0e-3]), slo, rem, np.zeros(1), STEEP).max_tokens == 1
    assert pace_step(np.array([5.5e-3]), slo, rem, np.zeros(1), STEEP).max_tokens == 2
    assert pace_step(np.array([4.0e-3]), slo, rem, np.zeros(1), STEEP, margin=0.0).max_tokens == 4


def test_everyone_rides_when_the_step_is_short_enough_for_all():
    flat = np.full(9, 4.0e-3)
    flat[0] = 0.0
    slo = np.array([4.8, 20.0, 20.0]) / 1e3
    choice = pace_step(np.zeros(3), slo, np.full(3, 50), np.zeros(3), flat)
    assert choice.include.all() and choice.on_track == 3 and choice.max_tokens == 8


def test_a_request_that_sat_out_max_skips_steps_is_always_in():
    slo = np.array([4.8, 20.0]) / 1e3
    slack = np.array([0.0, 30.0]) / 1e3
    assert pace_step(slack, slo, np.full(2, 9), np.array([0, 3]), STEEP).include.tolist() == [
        True,
        False,
    ]
    forced = pace_step(slack, slo, np.full(2, 9), np.array([0, 4]), STEEP, max_skips=4)
    assert forced.include[1]


def test_a_bad_step_table_is_refused_with_the_field_named():
    # the public entry points check the table; the scheduler's trusted paths build it valid
    slo, rem = np.array([4.8e-3]), np.array([10])
    falling = STEEP.copy()
    falling[3] = 1e-3
    with pytest.raises(ValueError, match="step_s must be non-decreasing"):
        pace_step(np.zeros(1), slo, rem, np.zeros(1), falling)
    with pytest.raises(ValueError, match="step_s has"):
        pace_step(np.zeros(3), np.full(3, 4.8e-3), np.full(3, 9), np.zeros(3), STEEP[:3])
    with pytest.raises(ValueError, match="step_s must be non-decreasing"):
        gate_prompts(np.zeros(1), slo, rem, falling, np.array([4.8e-3]), np.array([9]))
    with pytest.raises(ValueError, match="step_s has"):
        gate_prompts(np.zeros(0), slo[:0], rem[:0], STEEP[:1], np.array([4.8e-3]), np.array([9]))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-30.0, 40.0),  # slack, ms
            st.floats(3.0, 25.0),  # SLO, ms
            st.integers(1, 40),  # remaining tokens
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.floats(0.0, 3.0), min_size=8, max_size=8),
)
def test_choice_keeps_the_most_requests_on_track(reqs, increments):
    """Against every subset: the choice has the most requests on track after the step, at
    least one request decodes, the step's token limit never makes an included on-track request
    or a left-out one late, and equal input gives equal output."""
    slack = np.array([r[0] for r in reqs]) / 1e3
    slo = np.array([r[1] for r in reqs]) / 1e3
    rem = np.array([r[2] for r in reqs])
    step = np.concatenate([[0.0], 3.5e-3 + np.cumsum(increments) / 1e3])
    n = len(reqs)
    choice = pace_step(slack, slo, rem, np.zeros(n), step, margin=0.0)
    cap = slo + np.where(slack >= 0, slack, slack / rem)
    best = max(
        _on_track(np.isin(np.arange(n), subset), slack, cap, step)
        for k in range(1, n + 1)
        for subset in itertools.combinations(range(n), k)
    )
    assert choice.include.any()
    assert choice.on_track == _on_track(choice.include, slack, cap, step) == best
    k = int(choice.include.sum())
    assert k <= choice.max_tokens < step.size
    t_k, t_max = step[k], step[choice.max_tokens]
    in_track = choice.include & (cap >= t_k)
    out_track = ~choice.include & (cap >= 2 * t_k)
    if choice.max_tokens > k:
        assert np.all(cap[in_track] >= t_max) and np.all(cap[out_track] >= 2 * t_max)
    again = pace_step(slack, slo, rem, np.zeros(n), step, margin=0.0)
    assert again.include.tolist() == choice.include.tolist()
    assert again.max_tokens == choice.max_tokens


def _gate_by_trials(slack, slo, rem, step, new_slo, new_rem) -> list[bool]:
    """The prompt gate's definition: one pacing trial per waiting prompt, in order."""
    ok = []
    base = pace_step(slack, slo, rem, np.zeros(slack.size), step).on_track if slack.size else 0
    for s, r in zip(new_slo, new_rem, strict=True):
        if slack.size >= step.size - 1:
            ok.append(False)
            continue
        trial = np.append(slack, 0.0), np.append(slo, s), np.append(rem, r)
        got = pace_step(*trial, np.zeros(slack.size + 1), step).on_track
        ok.append(bool(got >= base + (1 if s >= step[1] else 0)))
        if ok[-1]:
            (slack, slo, rem), base = trial, got
    return ok


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-20.0, 30.0), st.sampled_from([4.8, 6.7, 20.0]), st.integers(1, 30)),
        max_size=5,
    ),  # fmt: skip
    st.lists(st.tuples(st.sampled_from([3.0, 4.8, 6.7, 20.0]), st.integers(1, 30)), max_size=12),
)
def test_prompt_gate_is_one_trial_per_prompt(decoding, waiting):
    """gate_prompts skips the trials of prompts whose SLO was just turned away: the same
    answer as trying every waiting prompt in turn."""
    slack = np.array([d[0] for d in decoding]) / 1e3
    slo = np.array([d[1] for d in decoding]) / 1e3
    rem = np.array([d[2] for d in decoding], np.int64)
    new_slo = np.array([w[0] for w in waiting]) / 1e3
    new_rem = np.array([w[1] for w in waiting], np.int64)
    got = gate_prompts(slack, slo, rem, STEEP, new_slo, new_rem)
    assert got.tolist() == _gate_by_trials(slack, slo, rem, STEEP, new_slo, new_rem)


class _TimedEngine(MockEngine):
    """The mock engine on a virtual clock: a step costs the profile's latency of its bucket.
    Its draft is always wrong, so AdaServe decodes without speculating (as on this CPU)."""

    def draft_step(self, segments):
        vals, idx, offsets = super().draft_step(segments)
        return vals, (idx + 500) % self.vocab, offsets

    def __init__(self, profile: LatencyProfile, **kw) -> None:
        super().__init__(**kw)
        self.profile, self.now = profile, 0.0

    def forward(self, segments, moves=()):
        tokens = sum(len(s) for s in segments)
        bucket = next(b for b in self.profile.buckets if b >= tokens)
        self.now += float(self.profile.verify.latency_ms(bucket)) / 1e3
        return super().forward(segments, moves)


def _run(pacing: bool):
    # drafting is priced so high that AdaServe decodes without it from the first iteration
    prof = LatencyProfile.from_tables({1: 4.0, 2: 5.4, 4: 7.0, 8: 8.9}, draft_ms={1: 50.0})
    eng = _TimedEngine(prof, num_slots=3, max_step_tokens=8)
    sched = Scheduler(
        eng, policy="adaserve", token_budget=8, profile=prof, slo_pacing=pacing,
        clock=lambda: eng.now,
    )  # fmt: skip
    slos = (4.8, 20.0, 20.0)  # 1.2x and 5x the one-token step
    reqs = [
        Request(f"r{i}", tuple(range(100 + i, 104 + i)), 40, tpot_slo_ms=slo)
        for i, slo in enumerate(slos)
    ]
    states = [sched.submit(r) for r in reqs]
    sched.run_until_done()
    for r, s in zip(reqs, states, strict=True):
        last = r.prompt_ids[-1]
        assert s.output == [(last + j) % 1000 for j in range(1, 41)]
    return [s.attained() for s in states]


def test_pacing_lets_the_tight_request_attain_without_losing_the_loose_ones():
    assert _run(pacing=False) == [False, True, True]  # all in every step: 7 ms > 4.8 ms
    assert _run(pacing=True) == [True, True, True]


def test_pacing_is_on_only_where_batching_slows_the_step():
    steep = LatencyProfile.from_tables({1: 4.0, 2: 5.4, 4: 7.0, 8: 8.9})
    paper = LatencyProfile.from_tables({1: 30.0, 128: 55.0, 256: 85.0})  # flat below 128

    def applies(profile, pads=True, **kw):
        eng = MockEngine(num_slots=2)
        eng.pads_to_buckets = pads
        return Scheduler(eng, policy="adaserve", token_budget=64, profile=profile, **kw)

    assert applies(steep)._pacing_applies()
    assert not applies(steep, slo_pacing=False)._pacing_applies()
    assert not applies(paper, pads=False)._pacing_applies()  # 2 tokens: 30.2 ms
    assert applies(paper, pads=True)._pacing_applies()  # 2 tokens pad to 128: 55 ms
    assert not Scheduler(
        MockEngine(num_slots=2), policy="sarathi", token_budget=64, profile=steep
    )._pacing_applies()


def test_step_times_follow_observed_iterations():
    prof = LatencyProfile.from_tables({1: 4.0, 2: 5.4, 4: 7.0, 8: 8.9}, host_ms=0.5)
    times = StepTimes(prof, 8)
    assert times.seconds()[3] == times.seconds()[4]  # 3 tokens pad to bucket 4
    assert abs(times.seconds()[4] - 7.5e-3) < 1e-12
    for _ in range(50):
        times.observe(3, 9.0e-3)  # the bucket-4 step really takes 9 ms
    table = times.seconds()
    assert abs(table[4] - 9.0e-3) < 1e-5 and table[5] >= table[4]  # stays non-decreasing
    assert abs(table[2] - 5.9e-3) < 1e-12  # other buckets untouched
    loose = StepTimes(prof, 8, padded=False)
    assert abs(loose.seconds()[3] - 6.7e-3) < 1e-9  # interpolated between 2 and 4


def test_step_times_shrug_off_outliers():
    """Slow steps (a shared CPU's hiccups) up to half the window leave the estimate alone; a
    lasting slowdown is followed after window // 2 + 1 steps."""
    prof = LatencyProfile.from_tables({1: 4.0, 2: 5.4, 4: 7.0, 8: 8.9}, host_ms=0.0)
    times = StepTimes(prof, 8, window=7)
    for seconds in (11.0e-3, 9.0e-3, 1.0e-3, 12.0e-3):  # 2.75x, 2.25x, 0.25x, 3x
        times.observe(1, seconds)
        assert abs(times.seconds()[1] - 4.0e-3) < 1e-12
    for _ in range(4):
        times.observe(1, 5.0e-3)  # the machine really got 25% slower
    assert abs(times.seconds()[1] - 5.0e-3) < 1e-12
    assert abs(times.seconds()[2] - 5.4e-3) < 1e-12  # other buckets untouched


def _prompt_held_in_speculative_step(pacing: bool) -> tuple[int, bool]:
    prof = LatencyProfile.from_tables({1: 4.0, 2: 5.4, 4: 7.0, 8: 8.9, 64: 30.0},
                                      draft_ms={1: 0.1})  # fmt: skip
    eng = _TimedEngine(prof, num_slots=2)
    sched = Scheduler(eng, policy="adaserve", token_budget=64, profile=prof,
                      slo_pacing=pacing, clock=lambda: eng.now)  # fmt: skip
    a = sched.submit(Request("a", (1, 2, 3, 4), 40, tpot_slo_ms=4.8))
    sched.step()  # a's prompt: its first token
    assert len(a.output) == 1
    b = sched.submit(Request("b", tuple(range(10, 18)), 40, tpot_slo_ms=4.8))
    sched.step()  # a decodes; the draft has not been switched off yet, so this step speculates
    assert sched.step_log[-1].select_seconds > 0
    return b.cached, sched._pacing_applies()


def test_speculative_steps_admit_prompts_on_pacing_terms():
    """A speculative step prefills a waiting prompt only when its request would add one
    request on track, as a paced plain step does: here the second 1.2x request cannot share
    steps with the first (5.4 ms > 4.8 ms) and waits; without pacing its prompt rides along."""
    assert _prompt_held_in_speculative_step(pacing=True) == (0, True)
    assert _prompt_held_in_speculative_step(pacing=False) == (8, False)
