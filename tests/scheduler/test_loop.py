"""The scheduler loop against the mock engine: batching, prefill chunks, speculation, cancel."""

import numpy as np
import pytest
from mock_engine import MockEngine

from adaserve_jax.scheduler.budget import LatencyProfile
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.policy import parse_policy
from adaserve_jax.scheduler.request import FinishReason, Phase, Request


def _req(i, prompt_len=10, max_tokens=12, **kw):
    return Request(f"r{i}", tuple(range(100 + i, 100 + i + prompt_len)), max_tokens, **kw)


def _expected(req):
    last = req.prompt_ids[-1]
    return [(last + j) % 1000 for j in range(1, req.max_tokens + 1)]


@pytest.mark.parametrize("policy", ["autoregressive", "sarathi", "spec:3", "tree:3,2", "adaserve"])
def test_every_policy_produces_the_target_sequence(policy):
    eng = MockEngine(num_slots=3)
    prof = LatencyProfile.cpu_reference() if policy == "adaserve" else None
    sched = Scheduler(eng, policy=policy, token_budget=64, prefill_chunk=8, profile=prof)
    reqs = [_req(i, prompt_len=5 + 7 * i, tpot_slo_ms=50.0) for i in range(5)]
    states = [sched.submit(r) for r in reqs]
    sched.run_until_done()
    for r, s in zip(reqs, states, strict=True):
        assert s.output == _expected(r)
        assert s.finish_reason is FinishReason.LENGTH and s.phase is Phase.DONE
    assert sched.alloc.used_slots == 0
    assert all(sum(len(seg) for seg in call) <= 64 for call in eng.forward_calls)
    if parse_policy(policy).speculative:
        assert sum(s.stats.accepted for s in states) > 0
        assert all(s.stats.selected >= s.stats.accepted for s in states)


def test_chain_speculation_accepts_the_whole_chain():
    eng = MockEngine(num_slots=1)
    sched = Scheduler(eng, policy="spec:3", token_budget=64)
    s = sched.submit(_req(0, max_tokens=13))
    sched.run_until_done()
    # first token from prefill, then 3 steps of 3 accepted + 1 bonus = 12 more
    assert s.stats.steps == 3 and s.stats.accepted == 9
    assert s.output == _expected(_req(0, max_tokens=13))


def test_tree_compaction_moves_are_issued():
    eng = MockEngine(num_slots=1, p_right=0.3)  # the right child is not the most likely one
    sched = Scheduler(eng, policy="tree:3,2", token_budget=64)
    s = sched.submit(_req(0, max_tokens=20))
    sched.run_until_done()
    assert s.output == _expected(_req(0, max_tokens=20))
    assert eng.moves_seen and all(m.dst < m.src for m in eng.moves_seen)


def test_sarathi_chunks_prefill_and_decode_goes_first():
    eng = MockEngine(num_slots=2)
    sched = Scheduler(eng, policy="sarathi", token_budget=64, prefill_chunk=8)
    a = sched.submit(_req(0, prompt_len=3, max_tokens=30))
    sched.step()  # a prefilled
    b = sched.submit(_req(1, prompt_len=40, max_tokens=5))
    sched.step()
    call = eng.forward_calls[-1]
    assert [len(s) for s in call] == [1, 8]  # a's decode token first, then an 8-token chunk of b
    assert call[1].slot == b.slot and call[1].ctx_len == 0
    sched.run_until_done()
    assert a.output == _expected(a.request) and b.output == _expected(b.request)


def test_cancel_frees_the_slot_and_waiting_request_takes_it():
    eng = MockEngine(num_slots=1)
    sched = Scheduler(eng, token_budget=64)
    a = sched.submit(_req(0, max_tokens=100))
    b = sched.submit(_req(1, max_tokens=4))
    sched.step()
    sched.step()
    assert b.phase is Phase.WAITING
    sched.cancel(a)
    assert a.finish_reason is FinishReason.CANCELLED and sched.alloc.free_slots == 1
    sched.run_until_done()
    assert b.output == _expected(b.request)


@pytest.mark.parametrize("policy", ["autoregressive", "spec:3", "tree:3,2", "adaserve"])
def test_eos_and_stop_strings(policy):
    """Finish rules inside a verified chunk (speculation accepts several tokens at once): the
    tokens past EOS, a stop string or max_tokens are dropped, and only kept tokens stream."""
    eng = MockEngine(num_slots=3)
    streamed = {}
    sched = Scheduler(
        eng,
        policy=policy,
        token_budget=64,
        eos_id=113,
        decode_text=lambda ids: " ".join(map(str, ids)),
        profile=LatencyProfile.cpu_reference() if policy == "adaserve" else None,
        on_tokens=lambda r, toks: streamed.setdefault(r.request.request_id, []).extend(toks),
    )
    a = sched.submit(_req(0, prompt_len=10, max_tokens=50))  # last prompt token 109 -> 110..113
    b = sched.submit(_req(5, prompt_len=3, max_tokens=50, stop=("110",)))  # 107 -> 108, 109, 110
    c = sched.submit(_req(1, prompt_len=3, max_tokens=5))  # 103 -> 104..108, no rule but length
    sched.run_until_done()
    assert a.output == [110, 111, 112, 113] and a.finish_reason is FinishReason.EOS
    assert b.output == [108, 109, 110] and b.finish_reason is FinishReason.STOP
    assert c.output == [104, 105, 106, 107, 108] and c.finish_reason is FinishReason.LENGTH
    assert streamed == {"r0": a.output, "r5": b.output, "r1": c.output}


def test_bad_requests_are_rejected_before_work():
    eng = MockEngine(num_slots=1, max_len=32)
    sched = Scheduler(eng, token_budget=16)
    with pytest.raises(ValueError, match="exceeds the context"):
        sched.submit(_req(0, prompt_len=30, max_tokens=5))
    with pytest.raises(ValueError, match="max_tokens"):
        _req(0, max_tokens=0)
    with pytest.raises(ValueError, match="tpot_slo_ms"):
        _req(0, tpot_slo_ms=float("nan"))
    with pytest.raises(ValueError, match="tpot_slo_ms"):
        _req(0, tpot_slo_ms=-1.0)
    with pytest.raises(ValueError, match="unknown policy"):
        Scheduler(eng, policy="beam:4")
    assert not eng.forward_calls


def test_service_streams_and_survives_a_failing_iteration():
    from adaserve_jax.scheduler.service import ServingLoop

    class Flaky(MockEngine):
        fail_next = False

        def forward(self, segments, moves=()):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("boom")
            return super().forward(segments, moves)

    eng = Flaky(num_slots=2)
    loop = ServingLoop(Scheduler(eng, token_budget=64))
    try:
        eng.fail_next = True
        bad = loop.submit(_req(0, max_tokens=5))
        assert bad.wait(10).finish_reason is FinishReason.ERROR and "boom" in bad.state.error
        good = loop.submit(_req(1, max_tokens=6))
        assert sum(list(good), []) == _expected(good.request)
        assert loop.stats()["slots_in_use"] == 0
    finally:
        loop.shutdown(5)


def test_selection_overhead_is_recorded():
    eng = MockEngine(num_slots=4)
    sched = Scheduler(
        eng, policy="adaserve", token_budget=64, profile=LatencyProfile.cpu_reference()
    )
    for i in range(4):
        sched.submit(_req(i, max_tokens=8, tpot_slo_ms=20.0))
    sched.run_until_done()
    assert any(r.select_seconds > 0 for r in sched.step_log)
    assert np.sum([r.accepted for r in sched.step_log]) > 0


def test_scheduler_package_never_imports_jax():
    import subprocess
    import sys

    code = (
        "import sys, adaserve_jax.scheduler.loop, adaserve_jax.scheduler.service, "
        "adaserve_jax.scheduler.policy; assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("policy", ["spec:4", "tree:3,2", "adaserve"])
def test_trees_stay_inside_the_slot_and_the_step(policy):
    # prompt + max_tokens fill the slot exactly: trees near the end must be truncated, and
    # draft catch-up chains + prefill chunks must fit the largest step
    eng = MockEngine(num_slots=4, max_len=40, max_step_tokens=20)
    prof = LatencyProfile.cpu_reference() if policy == "adaserve" else None
    sched = Scheduler(eng, policy=policy, token_budget=20, profile=prof)
    reqs = [_req(i, prompt_len=10 + i, max_tokens=30 - i, tpot_slo_ms=10.0) for i in range(6)]
    states = [sched.submit(r) for r in reqs]
    sched.run_until_done()
    assert [s.output for s in states] == [_expected(r) for r in reqs]


def test_budget_too_small_for_draft_catch_up_is_rejected():
    with pytest.raises(ValueError, match="catch-up"):
        Scheduler(MockEngine(num_slots=8), policy="spec:4", token_budget=32)


def test_adaserve_learns_acceptance_from_its_verify_steps():
    """The mock draft is under-confident (top child q = 0.8 at depth 1, the target always
    agrees): the calibrator sees every verified edge and lifts the top children's rate."""
    eng = MockEngine(num_slots=2)
    sched = Scheduler(
        eng, policy="adaserve", token_budget=64, profile=LatencyProfile.cpu_reference()
    )
    states = [sched.submit(_req(i, max_tokens=40, tpot_slo_ms=50.0)) for i in range(2)]
    sched.run_until_done()
    cal = sched.calibrator
    assert cal.observations > 20
    # every top child (rank 0) whose parent was accepted was accepted
    top = cal.verified[0] > 0
    assert np.all(cal.accepted[0][top] == pytest.approx(cal.verified[0][top]))
    assert all(s.output == _expected(_req(i, max_tokens=40)) for i, s in enumerate(states))


def test_adaserve_tree_depth_shrinks_to_fit_a_small_budget():
    eng = MockEngine(num_slots=4)
    sched = Scheduler(eng, policy="adaserve", token_budget=20)  # 4 slots x (depth + 1) <= 20
    assert sched.policy.shape.depth == 4
    with pytest.raises(ValueError, match="depth 6"):
        Scheduler(eng, policy="spec:6", token_budget=20)  # fixed policies keep their shape


def test_adaserve_decodes_without_the_draft_when_speculation_does_not_pay():
    """A profile where any step above one token costs 50x: AdaServe picks roots only, stops
    calling the draft model (explorations back off), and still produces the target's tokens;
    with a flat profile it keeps speculating every iteration."""

    class Counting(MockEngine):
        draft_calls = 0

        def draft_step(self, segments):
            self.draft_calls += 1
            return super().draft_step(segments)

    steep = LatencyProfile.from_tables({1: 1.0, 2: 50.0, 64: 60.0}, draft_ms={1: 0.1})
    flat = LatencyProfile.from_tables({1: 1.0, 2: 1.0, 64: 1.0}, draft_ms={1: 0.0})
    runs = {}
    for name, prof in (("steep", steep), ("flat", flat)):
        eng = Counting(num_slots=1)
        sched = Scheduler(eng, policy="adaserve", token_budget=64, profile=prof)
        s = sched.submit(_req(0, max_tokens=120, tpot_slo_ms=1e4))
        sched.run_until_done()
        assert s.output == _expected(_req(0, max_tokens=120))
        runs[name] = (eng.draft_calls, sched.iterations, s.stats.accepted)
    calls, iters, accepted = runs["steep"]
    assert accepted == 0 and calls < iters / 4  # prefill + a few backed-off explorations
    calls, iters, accepted = runs["flat"]
    assert accepted > 0 and calls >= iters - 1


def _adaserve_decoding(num_slots: int, decoding: int, max_tokens: int, **kw) -> Scheduler:
    """An adaserve scheduler (budget 64, time = iterations) with `decoding` short requests
    already decoding."""
    sched = Scheduler(
        MockEngine(num_slots=num_slots), policy="adaserve", token_budget=64, prefill_chunk=64,
        profile=LatencyProfile.cpu_reference(), **kw,
    )  # fmt: skip
    sched.clock = lambda s=sched: float(s.iterations)
    for i in range(decoding):
        sched.submit(_req(i, prompt_len=4, max_tokens=max_tokens, tpot_slo_ms=1e5))
    for _ in range(3):
        sched.step()  # the short prompts are decoding now
    return sched


def test_adaserve_prefill_floor_trades_tree_room_for_ttft():
    """With trees reserved first (floor 0) a long prompt waits behind the decoding requests'
    candidate trees; a prefill floor keeps part of every step for it."""
    first_token_iteration = {}
    for floor in (0, 48):
        sched = _adaserve_decoding(4, 3, 60, prefill_floor=floor)
        late = sched.submit(_req(9, prompt_len=200, max_tokens=4, tpot_slo_ms=1e5))
        sched.run_until_done()
        assert late.output == _expected(_req(9, prompt_len=200, max_tokens=4))
        first_token_iteration[floor] = late.first_token_time
    assert first_token_iteration[48] < first_token_iteration[0]
    with pytest.raises(ValueError, match="prefill_floor"):
        Scheduler(MockEngine(), policy="adaserve", token_budget=64, prefill_floor=65)


def test_adaserve_prefills_requests_with_a_ttft_slo_before_reserving_trees():
    """A request that asks for a first-token deadline is prefilled ahead of the candidate
    trees (and of other waiting prompts); without one it waits behind the trees (floor 0)."""

    def run(ttft, with_other):
        sched = _adaserve_decoding(5, 3, 60)
        other = None
        if with_other:
            other = sched.submit(_req(8, prompt_len=200, max_tokens=4, tpot_slo_ms=1e5))
        late = sched.submit(
            _req(9, prompt_len=200, max_tokens=4, tpot_slo_ms=1e5, ttft_slo_ms=ttft)
        )
        sched.run_until_done()
        assert late.output == _expected(_req(9, prompt_len=200, max_tokens=4))
        return late.first_token_time, other.first_token_time if other else None

    # alone: the prompt goes before the trees only with the SLO
    assert run(50.0, False)[0] < run(None, False)[0]
    # behind an earlier prompt: the SLO puts it first
    late, other = run(50.0, True)
    assert late < other


def test_adaserve_reserve_is_admission_control():
    """Tokens reserved per decoding request keep prompts waiting while the step is full of
    running requests: a smaller reservation admits the late prompt sooner."""
    first = {}
    for reserve in (64, 1):  # 1: just the candidate trees
        sched = _adaserve_decoding(4, 2, 40, adaserve_reserve=reserve)
        late = sched.submit(_req(9, prompt_len=40, max_tokens=4, tpot_slo_ms=1e5))
        sched.run_until_done()
        assert late.output == _expected(_req(9, prompt_len=40, max_tokens=4))
        first[reserve] = late.first_token_time
    assert first[1] < first[64]
    with pytest.raises(ValueError, match="adaserve_reserve"):
        Scheduler(MockEngine(), policy="adaserve", token_budget=64, adaserve_reserve=0)


class _CountingDraft(MockEngine):
    """Records every draft step's segments and counts expansions."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.expands = 0
        self.draft_calls: list[list] = []

    def expand(self, *args):
        self.expands += 1
        return super().expand(*args)

    def draft_step(self, segments):
        self.draft_calls.append(
            [(s.slot, s.ctx_len, np.asarray(s.tokens).tolist()) for s in segments]
        )
        return super().draft_step(segments)


# any step above 8 tokens costs 50x: AdaServe decodes 8 requests without speculating
STEEP8 = LatencyProfile.from_tables({1: 1.0, 8: 1.0, 9: 50.0, 64: 60.0}, draft_ms={1: 0.1})


def test_adaserve_runs_the_draft_only_to_catch_up_before_an_exploration():
    """With the draft off, its cache falls a token per request behind every iteration and the
    draft is not run at all until an exploration is due; then draft steps over a budget of
    the backlog (64 tokens) catch it up until the rest fits the exploration's own draft step
    beside two tokens a request (64 - 16 = 48), and the exploration runs. Explorations keep
    their backed-off schedule, the mock's draft cache never has a hole (an expansion needs
    every row up to its root), and the output is still the target's."""
    eng = _CountingDraft(num_slots=8)
    sched = Scheduler(eng, policy="adaserve", token_budget=64, profile=STEEP8)
    reqs = [_req(i, prompt_len=4, max_tokens=150, tpot_slo_ms=1e4) for i in range(8)]
    states = [sched.submit(r) for r in reqs]
    sched.run_until_done()
    for r, s in zip(reqs, states, strict=True):
        assert s.output == _expected(r)
    decoding = sum(1 for r in sched.step_log if r.decode_requests)
    # explorations every 8, 16, 32, 64 iterations (plus the first)
    assert eng.expands <= 8 and decoding >= 140
    sizes = [sum(len(t) for _, _, t in call) for call in eng.draft_calls]
    catch_ups = [n for n in sizes[1:] if n > 48]  # the first call is the prompts' prefill
    # every other draft call is an exploration's own (each runs right after its catch-ups)
    assert len(sizes) - 1 - len(catch_ups) == eng.expands
    assert all(n == 64 for n in catch_ups[:-1]) or not catch_ups
    # the backlog is run through the draft once: no more tokens than were ever decoded
    assert sum(sizes[1:]) <= sum(len(s.output) for s in states) + 8 * eng.expands
    # between explorations no draft call at all: far fewer calls than decoding iterations
    assert len(sizes) <= 2 * eng.expands + sum(sizes) // 64 + 2


def test_adaserve_does_not_catch_up_for_an_exploration_that_can_never_fit():
    """An exploration runs once the draft's backlog fits beside two tokens a request; the
    backlog never drops below each request's pending token, so with 8 requests and a budget
    of 20 (< 3 x 8) no exploration can follow, and the draft is not run to catch up for one
    (before, it ran a catch-up step every iteration). The same requests with a budget of 24
    do catch up and explore."""
    calls = {}
    for budget in (20, 24):
        eng = _CountingDraft(num_slots=8)
        sched = Scheduler(eng, policy="adaserve", token_budget=budget, profile=STEEP8)
        # prompts of 2 tokens: all 8 are prefilled in one step and decode together
        reqs = [_req(i, prompt_len=2, max_tokens=120, tpot_slo_ms=1e4) for i in range(8)]
        states = [sched.submit(r) for r in reqs]
        sched.run_until_done()
        assert [s.output for s in states] == [_expected(r) for r in reqs]
        calls[budget] = (len(eng.draft_calls), eng.expands)
    # 20: the prompts' prefill and the first exploration (it chooses roots only), nothing after
    assert calls[20] == (2, 1)
    assert calls[24][1] > 1 and calls[24][0] > calls[24][1] + 1


def test_adaserve_skips_explorations_the_last_one_says_would_choose_roots_only():
    """A request alone on STEEP8 speculates (a tree costs nothing over its root), so the
    calibrator learns the draft's acceptance. While 8 requests decode (a 9th token costs 50x),
    every exploration chooses roots only; after the first, a due exploration is judged in
    advance from the trees that one drafted, and skipped (no catch-up, no expansion) except
    every `predicted_skips_max`-th in a row. Once one request is left, the next due
    exploration is judged worth running, and it speculates again. Outputs are the target's
    either way."""
    runs = {}
    for skips_max in (0, 4):  # 0: every due exploration runs (the control)
        eng = _CountingDraft(num_slots=8)
        sched = Scheduler(eng, policy="adaserve", token_budget=64, profile=STEEP8)
        sched.predicted_skips_max = skips_max
        sched.explore_max = 16  # explorations due every 16 iterations once backed off
        verdicts = []
        judge = sched._speculation_could_pay

        def spy(decode, _judge=judge, _verdicts=verdicts):
            out = _judge(decode)
            _verdicts.append((len(decode), out))
            return out

        sched._speculation_could_pay = spy
        reqs = [
            _req(i, prompt_len=4, max_tokens=500 if i == 0 else 120, tpot_slo_ms=1e4)
            for i in range(8)
        ]
        states = [sched.submit(reqs[0])]
        for _ in range(10):  # alone first: it speculates, and the calibrator learns
            sched.step()
        assert sched.calibrator.observations > 0 and not sched._draft_off
        states += [sched.submit(r) for r in reqs[1:]]
        sched.run_until_done()
        for r, st in zip(reqs, states, strict=True):
            assert st.output == _expected(r)
        lone = [rec for rec in sched.step_log if rec.decode_requests == 1]
        runs[skips_max] = (eng.expands, len(eng.draft_calls), verdicts, lone)
    (expands0, calls0, _, _), (expands4, calls4, verdicts, lone) = runs[0], runs[4]
    skipped = [n for n, ok in verdicts if not ok]
    assert skipped and all(n == 8 for n in skipped)  # judged roots only with 8 requests
    assert expands4 < expands0 and calls4 < calls0  # fewer explorations and draft calls
    pattern = "".join("s" if not ok else "." for _, ok in verdicts)  # s: skipped
    # every 5th due exploration in a row runs (and its roots-only choice starts a new count)
    assert "ssss." in pattern and "sssss" not in pattern
    assert (1, True) in verdicts  # alone, speculation is judged worth exploring
    assert sum(rec.accepted for rec in lone) > 0  # and the lone request speculates again


def test_adaserve_never_drafts_a_request_that_finishes_between_explorations():
    """A short request that arrives while the draft is off and finishes before the next
    exploration costs no draft call: its prompt is prefilled by the target alone."""
    eng = _CountingDraft(num_slots=2)
    steep = LatencyProfile.from_tables({1: 1.0, 2: 50.0, 64: 60.0}, draft_ms={1: 0.1})
    sched = Scheduler(eng, policy="adaserve", token_budget=64, profile=steep)
    # no exploration after the first
    sched.explore_every = sched.explore_max = sched._explore_gap = 1000
    first = sched.submit(_req(0, prompt_len=4, max_tokens=200, tpot_slo_ms=1e4))
    for _ in range(20):
        sched.step()
    assert sched._draft_off
    calls = len(eng.draft_calls)
    short = _req(1, prompt_len=30, max_tokens=5, tpot_slo_ms=1e4)
    late = sched.submit(short)
    sched.run_until_done()
    assert late.output == _expected(short) and first.output == _expected(
        _req(0, max_tokens=200, prompt_len=4)
    )
    assert late.slot == 1 and len(eng.draft_calls) == calls  # no draft call since it came
    # the control: with an exploration due during its life, its prompt is caught up
    sched._explore_gap = 0
    again = sched.submit(_req(2, prompt_len=30, max_tokens=5, tpot_slo_ms=1e4))
    sched.run_until_done()
    assert again.output == _expected(_req(2, prompt_len=30, max_tokens=5))
    assert any(slot == again.slot for call in eng.draft_calls[calls:] for slot, _, _ in call)
