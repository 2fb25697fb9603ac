"""Streaks of easy and hard text in the simulator's acceptance model (calibration.py)."""

import dataclasses
import json

import numpy as np
import pytest
from test_sim import make_calibration

from adaserve_jax.engine.batch import Segment
from adaserve_jax.sim.calibrate import record_simulated, streak_of
from adaserve_jax.sim.calibration import CalibrationError, load_calibration
from adaserve_jax.sim.engine import SimEngine
from adaserve_jax.sim.profiles import load_profile


def with_rho(rho: float):
    return dataclasses.replace(make_calibration(), streak={"rho_per_token": rho})


def root_q(eng: SimEngine, ends: list[int]) -> np.ndarray:
    """The root top q the draft gives slots 0..n-1 whose text now ends at `ends`."""
    segs = [Segment.chain(s, e - 1, [1]) for s, e in enumerate(ends)]
    vals, _, _ = eng.draft_step(segs)
    return np.exp(vals[:, 0])


def test_streak_recovered_end_to_end_by_the_recorder():
    """The recorder measures a simulated streak back: rho 0.9 per token gives a clearly
    positive step correlation and a rho near 0.9; without streaks the correlation is ~0."""
    got = {}
    for rho in (0.0, 0.9):
        rec = record_simulated(with_rho(rho), depth=3, topk=2, requests=32, max_tokens=160)
        got[rho] = rec.streak
    assert abs(got[0.0]["step_corr"]) < 0.08
    assert got[0.9]["step_corr"] > 0.5
    assert got[0.9]["rho_per_token"] == pytest.approx(0.9, abs=0.04)
    assert got[0.9]["pairs"] > 1000 and got[0.9]["mean_gap_tokens"] > 1.0


def test_ease_is_kept_per_token_and_a_new_request_redraws():
    """rho 0.999: one token later the root row is almost surely the same; rho 0.5 after 40
    tokens, or a slot whose position went back (a new request), it is drawn afresh."""
    prof = load_profile("paper-llama70b")
    eng = SimEngine(prof, with_rho(0.999), num_slots=64, max_len=512, seed=3)
    first = root_q(eng, [10] * 64)
    assert (root_q(eng, [11] * 64) == first).mean() > 0.95
    assert (root_q(eng, [5] * 64) == first).mean() < 0.2  # position went back: new requests
    eng = SimEngine(prof, with_rho(0.5), num_slots=64, max_len=512, seed=3)
    first = root_q(eng, [10] * 64)
    assert (root_q(eng, [50] * 64) == first).mean() < 0.2
    # the kept rows are real depth-1 samples, and without streaks the old draw is unchanged
    assert set(first.round(5)) <= set(np.asarray(eng.calibration.confidence[1][:, 0]).round(5))
    plain = SimEngine(prof, make_calibration(), num_slots=4, max_len=512, seed=3)
    again = SimEngine(prof, with_rho(0.0), num_slots=4, max_len=512, seed=3)
    np.testing.assert_array_equal(root_q(plain, [9] * 4), root_q(again, [9] * 4))


def test_streak_of_pairs_consecutive_steps_of_one_request():
    """Perfectly repeated q within a request (correlation 1) gives rho ~1; a position that
    does not grow starts a new request (no pair across it); too few pairs: no streak."""
    rng = np.random.default_rng(0)
    runs = [[(p, q) for p in range(0, 60, 3)] for q in rng.random(10)]
    s = streak_of(runs)
    assert s["step_corr"] == pytest.approx(1.0) and s["rho_per_token"] >= 0.99
    assert s["pairs"] == 10 * 19 and s["mean_gap_tokens"] == 3.0
    mixed = [[(p, float(rng.random())) for p in range(0, 60, 3)] for _ in range(10)]
    assert streak_of(mixed)["rho_per_token"] < 0.35
    assert streak_of([[(0, 0.5), (4, 0.6), (2, 0.7)]]) == {}


def test_streak_field_round_trips_and_is_validated(tmp_path):
    cal = with_rho(0.8)
    got = load_calibration(cal.save(tmp_path / "c.json"))
    assert got.streak_rho == 0.8
    data = json.loads((tmp_path / "c.json").read_text())
    for bad, match in (([0.5], "field 'streak' must be an object"),
                       ({"rho_per_token": 1.0}, "rho_per_token=1.0"),
                       ({"rho_per_token": "x"}, "rho_per_token='x'")):  # fmt: skip
        data["streak"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(CalibrationError, match=match):
            load_calibration(tmp_path / "bad.json")
    assert load_calibration().streak_rho >= 0.0  # the shipped file loads


def test_recorder_stores_the_streak_only_when_asked():
    """Re-recording the shipped calibration without --streak keeps the simulator as it was:
    the measured streak is stored only with streak=True."""
    from adaserve_jax.sim.calibrate import Recorder

    rec = Recorder(depth=2, topk=2)
    rec.conf[1] = [np.array([0.6, 0.2])] * 4
    rec.path_len = [1, 2, 0]
    rec.roots = {"a": [(p, 0.1 * (p % 7)) for p in range(0, 40, 2)]}
    assert rec.result({}).streak == {}
    assert rec.result({}, streak=True).streak == rec.streak() != {}
