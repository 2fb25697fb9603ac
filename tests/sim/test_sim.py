"""Simulated engine: drives the real Scheduler, exact virtual time, calibrated acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaserve_jax.bench.workload import arrival_times_s, load_workload
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.policy import parse_policy
from adaserve_jax.scheduler.request import Request
from adaserve_jax.sim.__main__ import main as sim_main
from adaserve_jax.sim.calibrate import record_simulated
from adaserve_jax.sim.calibration import (
    Calibration,
    CalibrationError,
    empty_counts,
    load_calibration,
)
from adaserve_jax.sim.engine import SimEngine, VirtualClock
from adaserve_jax.sim.profiles import ProfileError, load_profile, load_profile_file
from adaserve_jax.sim.replay import SimSettings, build_requests, simulate

POLICIES = ("autoregressive", "sarathi", "spec:3", "tree:3,2", "adaserve")


def make_calibration(seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    bins, matched, count = empty_counts(2, num_bins=10)
    mid = 0.5 * (bins[1:] + bins[:-1])
    count[:] = 1000
    matched[0] = np.round(1000 * (0.15 + 0.7 * mid))  # over-confident at the top, under below
    matched[1] = np.round(1000 * 0.6 * mid)
    conf = {}
    for d in (1, 2, 3):
        q1 = rng.beta(3.0, 1.5 + 0.3 * d, 400)
        q2 = (1.0 - q1) * rng.beta(2.0, 3.0, 400)
        conf[d] = np.sort(np.stack([q1, q2], 1), axis=1)[:, ::-1].astype(np.float32)
    return Calibration(bins, matched, count, conf, {1: (100, 60)}, {"synthetic": True})


def paper_profile():
    return load_profile("paper-llama70b")


def write_trace(path, n=16, gap_ms=150.0, input_length=40, output_length=24):
    ratios = (1.2, -50, -150)
    entries = [
        {
            "emission_time_ms": i * gap_ms,
            "input_length": input_length + 7 * i,
            "output_length": output_length,
            "prompt": f"prompt {i}",
            "slo_ratio": ratios[i % 3],
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def cal():
    return make_calibration()


def _replay(tmp_path, cal, policy, **kw):
    entries = load_workload(write_trace(tmp_path / "trace.json", **kw))
    prof = paper_profile()
    reqs = build_requests(entries, prof.baseline_tpot_ms, max_output_len=24, max_len=1024)
    arr = arrival_times_s(entries, prof.baseline_tpot_ms)
    settings = SimSettings(max_batch=8, token_budget=128, prefill_chunk=64, max_len=1024)
    return simulate(prof, cal, policy, reqs, arr, settings)


@pytest.mark.parametrize("policy", POLICIES)
def test_all_policies_drive_the_real_scheduler(tmp_path, cal, policy):
    run = _replay(tmp_path, cal, policy)
    s = run.summary
    assert s["requests"] == 16 and s["output_tokens"] == 16 * 24
    assert 0.0 <= s["attainment"] <= 1.0
    assert set(s["per_category"]) == {"coding", "chat", "summarization"}
    if parse_policy(policy).speculative:
        assert s["mean_accepted_per_step"] > 1.2
        assert all(st.stats.steps > 0 for st in run.states)
    else:
        assert s["mean_accepted_per_step"] == 1.0
    assert s["wall_s"] > 0 and np.all(run.virtual_step_s > 0)


def test_replay_is_deterministic(tmp_path, cal):
    """Same trace, settings and seed: the same tokens at the same virtual times."""
    a_run = _replay(tmp_path, cal, "adaserve", n=24, gap_ms=40.0)
    b_run = _replay(tmp_path, cal, "adaserve", n=24, gap_ms=40.0)
    for a, b in zip(a_run.states, b_run.states, strict=True):
        assert a.output == b.output
        assert a.first_token_time == b.first_token_time
        assert a.last_token_time == b.last_token_time
    np.testing.assert_array_equal(a_run.virtual_step_s, b_run.virtual_step_s)


def test_virtual_time_advances_exactly_by_profile(cal):
    prof = paper_profile()
    clock = VirtualClock()
    eng = SimEngine(prof, cal, num_slots=4, max_len=256, clock=clock)
    sched = Scheduler(eng, policy="autoregressive", token_budget=64, clock=clock)
    sched.submit(Request("a", (1,) * 10, 5))
    sched.run_until_done()
    # one prefill step of 10 tokens, then 4 single-token decode steps
    assert [r.tokens for r in sched.step_log] == [10, 1, 1, 1, 1]
    expect = prof.verify_ms(10) / 1e3 + 4 * prof.verify_ms(1) / 1e3
    assert clock() == pytest.approx(expect, rel=1e-12)
    assert prof.verify_ms(1) == 30.0 and prof.verify_ms(128) == 55.0
    assert prof.verify_ms(64) == pytest.approx(30.0 + 25.0 * 63 / 127)


def test_speed_trace_scales_each_call_by_the_second_it_begins_in(cal):
    """With a SpeedTrace the same plain decode steps cost their price x the factor of the
    second they begin in: 1x in the first virtual second, 3x after it."""
    from adaserve_jax.sim.engine import SpeedTrace

    prof = paper_profile()
    clock = VirtualClock()
    eng = SimEngine(prof, cal, num_slots=4, max_len=256, clock=clock,
                    speed=SpeedTrace({"verify": [1.0, 3.0]}))  # fmt: skip
    sched = Scheduler(eng, policy="autoregressive", token_budget=64, clock=clock)
    sched.submit(Request("a", (1,) * 10, 60))
    sched.run_until_done()
    starts = np.cumsum([0.0] + [r.seconds for r in sched.step_log])[:-1]
    price = np.array([prof.verify_ms(r.tokens) / 1e3 for r in sched.step_log])
    factor = np.array([r.seconds for r in sched.step_log]) / price
    np.testing.assert_allclose(factor, np.where(starts < 1.0, 1.0, 3.0), rtol=1e-9)
    assert (starts >= 1.0).sum() > 5 and (starts < 1.0).sum() > 5


def test_speculative_step_time_is_verify_plus_draft(cal):
    prof = paper_profile()
    clock = VirtualClock()
    eng = SimEngine(prof, cal, num_slots=4, max_len=256, clock=clock)
    sched = Scheduler(eng, policy="tree:3,2", token_budget=128, clock=clock)
    for i in range(3):
        sched.submit(Request(f"r{i}", (1,) * 12, 16))
    sched.run_until_done()
    total = sum(r.seconds for r in sched.step_log)
    assert total == pytest.approx(eng.verify_seconds + eng.draft_seconds, rel=1e-12)
    verify = sum(prof.verify_ms(r.tokens) for r in sched.step_log) / 1e3
    assert eng.verify_seconds == pytest.approx(verify, rel=1e-12)
    # a decode step of 3 requests: draft step over 3 roots + 2 expansion steps over 3 * 2 rows
    step = next(r for r in sched.step_log if r.decode_requests == 3)
    want = prof.verify_ms(step.tokens) + prof.draft_ms(3) + 2 * prof.draft_ms(6)
    assert step.seconds == pytest.approx(want / 1e3, rel=1e-9)


def test_measured_expansion_call_prices_the_expansion(tmp_path, cal):
    """A profile with the real engine's measured expansion call (engine/profiler.py) prices
    that tree shape's expansion by it, over the smallest row bucket holding the decoding
    requests, instead of depth - 1 draft steps."""
    data = json.loads(Path(paper_profile().source).read_text())
    data["expand_ms"] = {"3,2,2": {"1": 3.5, "2": 5.0, "4": 7.25}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    prof = load_profile_file(path)
    clock = VirtualClock()
    eng = SimEngine(prof, cal, num_slots=4, max_len=256, clock=clock)
    calls, expand = [], eng.expand

    def timed_expand(root_vals, root_toks, root_pos, shape):
        t0 = clock()
        trees = expand(root_vals, root_toks, root_pos, shape)
        calls.append((int((np.asarray(root_pos) > 0).sum()), clock() - t0))
        return trees

    eng.expand = timed_expand
    sched = Scheduler(eng, policy="tree:3,2", token_budget=128, clock=clock)
    for i in range(3):
        sched.submit(Request(f"r{i}", (1,) * 12, 16 + 8 * i))
    sched.run_until_done()
    bucket = {1: 3.5, 2: 5.0, 3: 7.25}  # decoding requests -> row bucket 1, 2, 4
    assert {n for n, _ in calls} == {1, 2, 3}
    for n, seconds in calls:
        assert seconds == pytest.approx(bucket[n] / 1e3, rel=1e-12)
    # the first step with 3 decoding requests: draft step over their 3 roots + the call
    step = next(r for r in sched.step_log if r.decode_requests == 3)
    want = prof.verify_ms(step.tokens) + prof.draft_ms(3) + 7.25
    assert step.seconds == pytest.approx(want / 1e3, rel=1e-9)
    assert 2 * prof.draft_ms(6) != pytest.approx(7.25)  # the test tells the two prices apart


def test_acceptance_matches_calibration(cal):
    """Recording the simulator with the real-pair recorder recovers the calibration."""
    got = record_simulated(cal, depth=3, topk=2, requests=32, max_tokens=160, seed=1)
    ok = got.count >= 200
    assert ok[0].sum() >= 4
    want = cal.matched / cal.count
    np.testing.assert_allclose((got.matched / np.maximum(got.count, 1))[ok], want[ok], atol=0.06)
    # sampled draft confidence follows the calibration's samples
    for d in (1, 2, 3):
        np.testing.assert_allclose(got.confidence[d].mean(0), cal.confidence[d].mean(0), atol=0.03)


def test_walk_accepts_exactly_the_simulated_path(cal):
    prof = paper_profile()
    eng = SimEngine(prof, cal, num_slots=6, max_len=512, seed=5)
    shape = parse_policy("tree:3,2").shape
    vals, _, _ = eng.draft_step([])
    rv = np.log(cal.sample_confidence(eng.rng, 1, 6, 8))
    trees = eng.expand(rv, None, np.array([9, 0, 9, 9, 9, 9]), shape)
    truth = eng._truth
    from adaserve_jax.scheduler.confidence import sibling_rank

    active = trees.parents[[0, 2, 3, 4, 5]]  # slot 1 holds no tree
    np.testing.assert_array_equal(np.broadcast_to(trees.rank, active.shape), sibling_rank(active))
    from adaserve_jax.engine.tree import layout_depths, tree_depths

    depths = layout_depths(shape.num_nodes, shape.width, shape.topk)
    np.testing.assert_array_equal(np.broadcast_to(depths, active.shape), tree_depths(active))
    from adaserve_jax.engine.batch import Segment
    from adaserve_jax.engine.tree import accept_path

    segs = [
        Segment(s, 9, np.r_[77, trees.tokens[s, 1:]].astype(np.int32), trees.parents[s])
        for s in (0, 2, 3, 4, 5)
    ]
    sampled, offsets = eng.forward(segs, [])
    for seg, off in zip(segs, offsets, strict=True):
        path, emitted = accept_path(seg.parents, seg.tokens, sampled[off : off + len(seg)])
        node, want = 0, []
        while truth[seg.slot, node]:
            node = int(truth[seg.slot, node])
            want.append(node)
        assert path == want
        assert emitted[-1] == 0


def test_unknown_profile_name():
    with pytest.raises(ProfileError, match="unknown profile 'h100'"):
        load_profile("h100")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"baseline_tpot_ms": 30}, "verify_ms"),
        ({"verify_ms": {"1": 3, "8": 2}, "baseline_tpot_ms": 30}, "verify_ms"),
        ({"verify_ms": {"1": 3, "x": 4}, "baseline_tpot_ms": 30}, "verify_ms"),
        ({"verify_ms": {"1": 3}, "draft_ms": {"4": 2, "2": 3}, "baseline_tpot_ms": 1}, "draft_ms"),
        ({"verify_ms": {"1": 3}, "baseline_tpot_ms": "fast"}, "baseline_tpot_ms"),
        ({"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_rows": "some"}, "expand_rows"),
        (
            {"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_ms": {"3,2": {"1": 4}}},
            "expand_ms",
        ),
        (
            {"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_ms": {"3,2,2": {"1": -1}}},
            "expand_ms",
        ),
        (
            {"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_ms": {"3,2,2": {"x": 1}}},
            "expand_ms",
        ),
        ({"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_ms": {"3,2,2": 4}}, "expand_ms"),
        ({"verify_ms": {"1": 3}, "baseline_tpot_ms": 3, "expand_ms": [4]}, "expand_ms"),
    ],
)
def test_malformed_profile(tmp_path, data, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=field) as exc:
        load_profile_file(path)
    assert str(path) in str(exc.value)


def test_profile_not_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{nope")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(path))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("bins"), "bins"),
        (lambda d: d.__setitem__("bins", [0.0, 0.7, 0.5, 1.0]), "bins"),
        (lambda d: d["match"].pop("2"), "match"),
        (lambda d: d["match"]["1"]["matched"].__setitem__(0, 10**6), "matched"),
        (lambda d: d["confidence"].__setitem__("1", [[0.2, 0.9]]), "confidence"),
        (lambda d: d.__setitem__("topk", "two"), "topk"),
    ],
)
def test_malformed_calibration(tmp_path, cal, mutate, field):
    data = cal.to_json_dict()
    mutate(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=field) as exc:
        load_calibration(path)
    assert str(path) in str(exc.value)


def test_calibration_round_trip(tmp_path, cal):
    got = load_calibration(cal.save(tmp_path / "c.json"))
    np.testing.assert_array_equal(got.matched, cal.matched)
    np.testing.assert_allclose(got.confidence[2], cal.confidence[2], atol=1e-4)


def test_shipped_files_load():
    prof = load_profile("paper-llama70b")
    assert prof.baseline_tpot_ms == 30.0 and prof.verify_ms(1024) == 205.0
    cal = load_calibration()
    assert cal.topk >= 2


def test_cli_writes_bench_schema(tmp_path, cal):
    trace = write_trace(tmp_path / "trace.json", n=9)
    cpath = cal.save(tmp_path / "cal.json")
    out = tmp_path / "out.json"
    argv = ["--profile", "paper-llama70b", "--workload", str(trace), "--calibration", str(cpath)]
    argv += ["--policy", "autoregressive", "--policy", "adaserve", "--max-output-len", "16"]
    argv += ["--max-batch", "8", "--token-budget", "128", "--json", str(out), "--quiet"]
    sim_main(argv)
    data = json.loads(out.read_text())
    assert data["baseline_tpot_ms"] == 30.0
    for name in ("autoregressive", "adaserve"):
        p = data["policies"][name]
        for key in ("attainment", "violations", "goodput_tokens_per_s", "mean_accepted_per_step"):
            assert key in p
        assert set(p["per_category"]) == {"coding", "chat", "summarization"}


def test_cli_bad_profile_exits_with_message(tmp_path):
    trace = write_trace(tmp_path / "trace.json", n=3)
    with pytest.raises(SystemExit, match="unknown profile"):
        sim_main(["--profile", "nope", "--workload", str(trace)])


def test_bench_simulate_flag_delegates(tmp_path, cal):
    from adaserve_jax.bench.__main__ import main as bench_main

    trace = write_trace(tmp_path / "trace.json", n=6)
    out = tmp_path / "b.json"
    argv = ["--workload", str(trace), "--simulate", "paper-llama70b", "--policy", "spec:2"]
    argv += ["--num-requests", "6", "--max-output-len", "8", "--json", str(out)]
    result = bench_main(argv)
    assert result["simulated"] is True and json.loads(out.read_text())["policies"]["spec:2"]


def test_speed_trace_factors():
    """A real replay's per-second speeds: a second without calls carries the last measured
    one (the first measured one before any), past the end the last; a kind never measured
    falls back to verify's, and with nothing measured every call runs at its price."""
    from adaserve_jax.sim.engine import SpeedTrace

    tr = SpeedTrace({"verify": [None, 2.0, None, 3.0], "draft": [None, None]})
    assert [tr.factor("verify", t) for t in (0.5, 1.2, 2.9, 3.0, 99.0)] == [2.0, 2.0, 2.0, 3.0, 3.0]
    assert tr.factor("draft", 1.5) == 2.0 and tr.factor("expand", 3.5) == 3.0
    assert SpeedTrace({}).factor("verify", 1.0) == 1.0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="'verify'"):
            SpeedTrace({"verify": [1.0, bad]})


def test_speed_jitter_scatters_each_call_around_its_speed(cal):
    """With a SpeedJitter every plain step costs its price x the trace's factor x one draw of
    the sample normalized to mean 1 (so the factors average the trace's); the draws come from
    the engine's own seeded stream (same seed, same steps), and a kind without a sample uses
    verify's. Bad samples are refused by kind."""
    from adaserve_jax.sim.engine import SpeedJitter, SpeedTrace

    prof = paper_profile()

    def factors(seed):
        clock = VirtualClock()
        eng = SimEngine(prof, cal, num_slots=4, max_len=512, clock=clock, seed=seed,
                        speed=SpeedTrace({"verify": [2.0]}),
                        jitter=SpeedJitter({"verify": [1.0, 1.0, 4.0]}))  # fmt: skip
        sched = Scheduler(eng, policy="autoregressive", token_budget=64, clock=clock)
        sched.submit(Request("a", (1,) * 10, 300))
        sched.run_until_done()
        price = np.array([prof.verify_ms(r.tokens) / 1e3 for r in sched.step_log])
        return np.array([r.seconds for r in sched.step_log]) / price

    f = factors(0)
    np.testing.assert_allclose(np.unique(f.round(9)), [2.0 * 0.5, 2.0 * 2.0])  # 2 x {1, 4}/2
    assert 0.8 < f.mean() / 2.0 < 1.2 and (f > 2).sum() > 50
    np.testing.assert_array_equal(f, factors(0))
    assert not np.array_equal(f, factors(1))
    jit = SpeedJitter({"verify": [2.0]})
    assert jit.draw("expand", np.random.default_rng(0)) == 1.0
    for bad in ([], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="'verify'"):
            SpeedJitter({"verify": bad})
    with pytest.raises(ValueError, match="no 'verify' sample"):
        SpeedJitter({"draft": [1.0]})


def test_correlated_jitter_draws_in_spells_with_the_samples_distribution(cal):
    """SpeedJitter(corr_ms): consecutive steps' draws share a latent normal that decays with
    time constant corr_ms on the virtual clock, so with a memory much longer than a step
    (~30 ms here) neighbours draw nearly alike and with a much shorter one independently;
    either way each draw is a value of the sample (and the factors average about its mean x
    the trace's). A negative or non-finite corr_ms is refused."""
    from adaserve_jax.sim.engine import SpeedJitter, SpeedTrace

    prof = paper_profile()
    sample = np.linspace(0.5, 1.5, 101)

    def factors(corr_ms):
        clock = VirtualClock()
        eng = SimEngine(prof, cal, num_slots=4, max_len=512, clock=clock, seed=3,
                        speed=SpeedTrace({"verify": [2.0]}),
                        jitter=SpeedJitter({"verify": sample}, corr_ms=corr_ms))  # fmt: skip
        sched = Scheduler(eng, policy="autoregressive", token_budget=64, clock=clock)
        sched.submit(Request("a", (1,) * 10, 400))
        sched.run_until_done()
        price = np.array([prof.verify_ms(r.tokens) / 1e3 for r in sched.step_log])
        return np.array([r.seconds for r in sched.step_log]) / price / 2.0

    def lag1(x):
        x = x - x.mean()
        return float(np.dot(x[:-1], x[1:]) / np.dot(x, x))

    slow, fast = factors(3000.0), factors(1.0)
    assert lag1(slow) > 0.9 and abs(lag1(fast)) < 0.15
    for f in (slow, fast):
        assert np.isin(f.round(6), sample.round(6)).all()
    assert 0.9 < fast.mean() < 1.1
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="corr_ms"):
            SpeedJitter({"verify": [1.0]}, corr_ms=bad)


def test_budget_rule_prices_drafting_with_the_measured_expansion_call(cal, monkeypatch):
    """AdaServe's budget rule prices an iteration's drafting as the draft step over its
    catch-up chains plus the profile's expansion call for the shape and rows; a profile
    without that call (the paper's) prices depth draft steps over n x width tokens."""
    import dataclasses

    from adaserve_jax.scheduler import speculative_steps

    seen = []
    inner = speculative_steps.choose_budget_trusted

    def spy(profile, log_f, tightest, **kw):
        seen.append((log_f.shape[0], kw["draft_ms"]))
        return inner(profile, log_f, tightest, **kw)

    monkeypatch.setattr(speculative_steps, "choose_budget_trusted", spy)
    base = paper_profile()
    catch_up: list[int] = []
    for with_call in (False, True):
        prof = base
        if with_call:
            probe = Scheduler(SimEngine(base, cal, num_slots=8, max_len=512), policy="adaserve")
            d, w, k = (probe.policy.shape.depth, probe.policy.shape.width, probe.policy.shape.topk)
            prof = dataclasses.replace(base, expand_ms={(d, w, k): ((1, 4, 8), (7.0, 9.0, 13.0))})
        clock = VirtualClock()
        eng = SimEngine(prof, cal, num_slots=8, max_len=512, clock=clock)
        sched = Scheduler(eng, policy="adaserve", token_budget=256, clock=clock,
                          profile=prof.latency_profile())  # fmt: skip
        sched.predicted_skips_max = 0  # every due exploration runs: each rule call is one
        for i in range(3):
            sched.submit(Request(f"r{i}", (1,) * 20, 30, tpot_slo_ms=200.0))
        seen.clear()
        catch_up.clear()
        real_chains = sched._catch_up_chains

        def chains(decode, roster, _real=real_chains):
            out = _real(decode, roster)
            catch_up.append(int(out[1].size))
            return out

        sched._catch_up_chains = chains
        while len(seen) < 3:
            sched.step()
        shape, draft = sched.policy.shape, prof.latency_profile().draft.latency_ms
        for (n, draft_ms), tokens in zip(seen, catch_up[-len(seen) :], strict=True):
            assert n == 3
            if with_call:
                expect = draft(tokens) + 9.0  # 3 rows: the 4-row bucket
            else:
                expect = shape.depth * draft(3 * shape.width)
            assert draft_ms == pytest.approx(expect, rel=1e-9)
