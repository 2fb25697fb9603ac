"""Pooling the validations of repeated real runs (sim/pool.py) and the seed-scatter floor."""

import json
import math
from pathlib import Path

import pytest
from test_sim import make_calibration
from test_validate import bench_json, run

from adaserve_jax.sim.pool import main as pool_main
from adaserve_jax.sim.pool import pool
from adaserve_jax.sim.validate import noise_floor_pp

OPTIONS = {
    "profile": "bench", "host_ms": "measured", "speed": "trace", "speed_scale": 1.0,
    "trace_of": None, "jitter": "cell", "calibration": "cal.json", "seeds": 3,
}  # fmt: skip
SETUP = {"workload": "rps2.4_ol256.json", "num_requests": 32, "token_budget": 64}


def validation(rows: list[tuple[str, float, float, float]], **over) -> dict:
    """A validate JSON whose rows are (policy, time_scale, real, sim) attainments."""
    out = {
        **OPTIONS,
        "setup": SETUP,
        "rows": [
            {
                "policy": p,
                "time_scale": x,
                "real_attainment": a,
                "sim_attainment": b,
                "attainment_gap_pp": 100 * (b - a),
                "real_goodput": 10 * a,
                "sim_goodput": 10 * b,
                "real_accepted_per_step": 1.0,
                "sim_accepted_per_step": 1.0,
            }  # fmt: skip
            for p, x, a, b in rows
        ],
    }
    out.update(over)
    return out


def test_pooled_gap_is_the_gap_of_the_means():
    """Two runs that miss by +10 and -6 pp pool to +2 pp; rows keep the first file's order."""
    a = validation([("ada", 2.0, 0.50, 0.60), ("ar", 2.0, 0.40, 0.40)])
    b = validation([("ar", 2.0, 0.50, 0.50), ("ada", 2.0, 0.80, 0.74)])
    out = pool([("a.json", a), ("b.json", b)])
    ada, ar = out["rows"]
    assert (ada["policy"], ar["policy"]) == ("ada", "ar")
    assert ada["real_attainment_runs"] == [0.50, 0.80]
    assert ada["attainment_gap_pp"] == pytest.approx(2.0)
    assert ada["run_gaps_pp"] == pytest.approx([10.0, -6.0])
    assert ada["real_spread_pp"] == pytest.approx(30.0)
    assert ada["goodput_gap"] == pytest.approx(6.7 / 6.5 - 1)
    assert out["summary"]["ada"]["within_5pp"] == 1
    one = out["per_run_summary"]["ada"]
    assert one["mean_abs_gap_pp"] == pytest.approx(8.0)
    assert (one["within_5pp"], one["points"]) == (0, 2)
    assert out["summary"]["all"]["points"] == 2 and out["per_run_summary"]["all"]["points"] == 4


def test_runs_that_are_not_repeats_validated_alike_are_errors(tmp_path):
    a = validation([("ada", 2.0, 0.5, 0.6)])
    with pytest.raises(ValueError, match="at least two"):
        pool([("a.json", a)])
    other = validation([("ada", 2.0, 0.5, 0.6)], jitter=None)
    with pytest.raises(ValueError, match=r"b.json: field 'jitter' is None, a.json has 'cell'"):
        pool([("a.json", a), ("b.json", other)])
    other = validation([("ada", 2.0, 0.5, 0.6)], setup={**SETUP, "num_requests": 64})
    with pytest.raises(ValueError, match="b.json: field 'setup'"):
        pool([("a.json", a), ("b.json", other)])
    other = validation([("ada", 4.0, 0.5, 0.6)])
    with pytest.raises(ValueError, match=r"b.json: field 'rows' has points .*4\.0"):
        pool([("a.json", a), ("b.json", other)])
    twice = validation([("ada", 2.0, 0.5, 0.6), ("ada", 2.0, 0.5, 0.6)])
    with pytest.raises(ValueError, match="b.json: field 'rows' repeats"):
        pool([("a.json", a), ("b.json", twice)])
    # an option newer than some saved validations: absent counts as its default (None)
    assert pool([("a.json", a), ("b.json", {**a, "jitter_corr_ms": None})])["rows"]
    memory = validation([("ada", 2.0, 0.5, 0.6)], jitter_corr_ms=20.0)
    with pytest.raises(ValueError, match=r"b.json: field 'jitter_corr_ms' is 20.0, a.json"):
        pool([("a.json", a), ("b.json", memory)])
    old = {k: v for k, v in a.items() if k != "setup"}
    with pytest.raises(ValueError, match="b.json: no field 'setup' \\(re-run sim.validate\\)"):
        pool([("a.json", a), ("b.json", old)])
    # the command line: the same errors, and an unreadable file named
    for name, data in (("a.json", a), ("b.json", other)):
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="b.json: field 'rows'"):
        pool_main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="missing.json"):
        pool_main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])


def test_validations_of_one_bench_pool_from_the_command_line(tmp_path, capsys):
    """Two validate runs of one (synthetic) bench (seed 0 both: identical) pool to that run's
    gap, written as JSON."""
    cal = tmp_path / "cal.json"
    make_calibration().save(cal)
    path = bench_json(tmp_path, {"autoregressive": 0.0, "adaserve": 0.0})
    outs = []
    for i in range(2):
        v = tmp_path / f"v{i}.json"
        run(path, str(cal), "--json", str(v))
        outs.append(str(v))
    out = pool_main([*outs, "--json", str(tmp_path / "pooled.json")])
    assert json.loads((tmp_path / "pooled.json").read_text()) == out
    single = json.loads(Path(outs[0]).read_text())
    assert out["setup"]["workload"] == "trace.json"
    for pooled_row, row in zip(out["rows"], single["rows"], strict=True):
        assert pooled_row["attainment_gap_pp"] == pytest.approx(row["attainment_gap_pp"])
    assert "pooled mean |gap|" in capsys.readouterr().out


def test_noise_floor_from_the_seeds_scatter():
    """sd of (0.4, 0.5, 0.6) is 0.1: E|gap| = 10 pp * sqrt(4/3 * 2/pi); one seed: no floor."""
    rows = [
        {"policy": "ada", "sim_attainment_seeds": [0.4, 0.5, 0.6]},
        {"policy": "ar", "sim_attainment_seeds": [0.5, 0.5, 0.5]},
    ]
    floor = noise_floor_pp(rows, 3)
    assert floor["ada"] == pytest.approx(10 * math.sqrt(4 / 3 * 2 / math.pi))
    assert floor["ar"] == 0.0
    assert floor["all"] == pytest.approx(floor["ada"] / 2)
    assert noise_floor_pp(rows, 1) == {}


def test_validate_records_each_seeds_attainment(tmp_path):
    cal = tmp_path / "cal.json"
    make_calibration().save(cal)
    path = bench_json(tmp_path, {"adaserve": 0.0})
    out = run(path, str(cal), "--seeds", "2")  # the later --seeds wins
    (row,) = out["rows"]
    assert len(row["sim_attainment_seeds"]) == 2
    assert row["sim_attainment"] == pytest.approx(sum(row["sim_attainment_seeds"]) / 2)
    assert out["seeds"] == 2 and "adaserve" in out["noise_floor_pp"]
