"""The simulator's validation against a (here synthetic) real bench run's JSON."""

import json
from pathlib import Path

import pytest
from test_sim import make_calibration, write_trace

from adaserve_jax.sim.validate import main as validate_main

PROFILE = {
    "verify_ms": {"1": 4.0, "4": 6.0, "16": 9.0, "64": 20.0},
    "draft_ms": {"1": 1.0, "4": 1.2, "16": 1.5, "64": 3.0},
    "expand_ms": {"2,1,1": {"1": 2.0, "4": 2.5}},
    "baseline_tpot_ms": 4.0,
}


def bench_json(
    tmp_path: Path, host_ms: dict, speed: dict | None = None, draft: dict | None = None
) -> Path:
    trace = write_trace(tmp_path / "trace.json", n=6)
    policies = {
        name: {
            "attainment": 0.5,
            "goodput_tokens_per_s": 100.0,
            "mean_accepted_per_step": 1.5,
            "wall_s": 1.0,
            "tpot_p50_ms": 5.0,
            "host_ms_per_iteration": ms,
            "verify_speed": (speed or {}).get(name),
            # draft step and expansion speeds (as recorded by benches since c074cbe)
            "draft_speed": (draft or {}).get(name),
            "expand_speed": (draft or {}).get(name),
        }
        for name, ms in host_ms.items()
    }
    data = {
        "baseline_tpot_ms": 4.0,
        "settings": {
            "workload": str(trace),
            "num_requests": 6,
            "max_output_len": 8,
            "max_prompt_len": 32,
            "max_len": 256,
            "max_batch": 4,
            "token_budget": 64,
            "latency_profile": PROFILE,
        },  # fmt: skip
        "sweep": [{"time_scale": 2.0, "policies": policies}],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def cal_file(tmp_path):
    path = tmp_path / "cal.json"
    make_calibration().save(path)
    return str(path)


def run(path, cal_file, *extra):
    return validate_main([str(path), "--calibration", cal_file, "--seeds", "1", *extra])


def test_measured_host_time_per_policy(tmp_path, cal_file):
    path = bench_json(tmp_path, {"autoregressive": 0.4, "spec:2": 2.5})
    out = run(path, cal_file, "--host-ms", "measured")
    assert out["host_ms"] == "measured"
    rows = {r["policy"]: r for r in out["rows"]}
    assert rows["autoregressive"]["sim_host_ms"] == 0.4
    assert rows["spec:2"]["sim_host_ms"] == 2.5
    # the host term is paid every iteration: more of it, more simulated time per token
    flat = {r["policy"]: r for r in run(path, cal_file, "--host-ms", "0")["rows"]}
    assert rows["spec:2"]["sim_tpot_p50_ms"] > flat["spec:2"]["sim_tpot_p50_ms"]


def test_measured_host_time_missing_or_bad(tmp_path, cal_file):
    path = bench_json(tmp_path, {"autoregressive": None})
    with pytest.raises(SystemExit, match="host_ms_per_iteration"):
        run(path, cal_file, "--host-ms", "measured")
    with pytest.raises(SystemExit):
        run(path, cal_file, "--host-ms", "lots")


def test_cell_speed_prices_each_replay_at_its_own_speed(tmp_path, cal_file):
    """`--speed cell` scales the profile per policy and load by the replay's verify_speed:
    the same replay recorded at 1.5x the profile's latencies is simulated that much slower."""
    tpot = {}
    for speed in (1.0, 1.5):
        path = bench_json(tmp_path, {"autoregressive": 0.0}, speed={"autoregressive": speed})
        out = run(path, cal_file, "--speed", "cell")
        (row,) = out["rows"]
        assert out["speed"] == "cell" and row["sim_speed"] == speed
        tpot[speed] = row["sim_tpot_p50_ms"]
    # every step 1.5x longer (and, at the same arrival times, more requests share the steps)
    assert tpot[1.5] >= 1.5 * tpot[1.0] - 1e-9
    missing = bench_json(tmp_path, {"autoregressive": 0.4})
    with pytest.raises(SystemExit, match="verify_speed"):
        run(missing, cal_file, "--speed", "cell")
    with pytest.raises(SystemExit):
        run(path, cal_file, "--speed", "cell", "--profile", "local")


def test_speed_scale_slows_every_call_on_top_of_the_chosen_speed(tmp_path, cal_file):
    """`--speed-scale X` is a sensitivity check: every device latency times X, on top of the
    profile (and of `--speed cell`'s per-replay speeds); it is recorded in the output."""
    path = bench_json(tmp_path, {"autoregressive": 0.0}, speed={"autoregressive": 1.2})
    tpot = {}
    for mode in ("profile", "cell"):
        for scale in (1.0, 2.0):
            out = run(path, cal_file, "--speed", mode, "--speed-scale", str(scale))
            assert out["speed_scale"] == scale
            tpot[mode, scale] = out["rows"][0]["sim_tpot_p50_ms"]
        assert tpot[mode, 2.0] >= 2.0 * tpot[mode, 1.0] - 1e-9
    assert tpot["cell", 1.0] > tpot["profile", 1.0]  # the cell's own 1.2x is still applied
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            run(path, cal_file, "--speed-scale", bad)
    with pytest.raises(SystemExit):
        run(path, cal_file, "--speed-scale", "2", "--profile", "local")


def test_cell_speed_prices_the_drafts_calls_at_their_own_speed(tmp_path, cal_file):
    """A replay whose draft calls ran 3x their profile price while its verify steps ran at
    the price: `--speed cell` slows the speculative policy's simulated steps, not the plain
    policy's; without recorded draft speeds the verify speed prices the draft's calls too."""
    tpot = {}
    for draft in (None, 3.0):
        host = {"autoregressive": 0.0, "spec:2": 0.0}
        path = bench_json(
            tmp_path, host, speed=dict.fromkeys(host, 1.0), draft=dict.fromkeys(host, draft)
        )
        rows = {r["policy"]: r for r in run(path, cal_file, "--speed", "cell")["rows"]}
        assert rows["spec:2"]["sim_draft_speed"] == rows["spec:2"]["sim_expand_speed"]
        assert rows["spec:2"]["sim_draft_speed"] == (draft or 1.0)
        tpot[draft] = {p: r["sim_tpot_p50_ms"] for p, r in rows.items()}
    assert tpot[3.0]["autoregressive"] == tpot[None]["autoregressive"]
    assert tpot[3.0]["spec:2"] > tpot[None]["spec:2"] + 1.0  # +2 x (1.0-1.2 + 2.0) ms a step


def test_per_run_baselines_set_each_rounds_slos(tmp_path, cal_file):
    """A `--baseline per-run` bench records each round's baseline; the simulator replays every
    round at its own (SLOs and arrivals): loose baselines, every SLO met; tight ones, none."""
    att = {}
    for name, bases in (("loose", [40.0, 40.0]), ("tight", [0.5, 0.5])):
        path = bench_json(tmp_path, {"autoregressive": 0.0})
        data = json.loads(path.read_text())
        data["sweep"][0]["policies"]["autoregressive"]["baseline_tpot_ms"] = bases
        path.write_text(json.dumps(data))
        (row,) = run(path, cal_file)["rows"]
        att[name] = row["sim_attainment"]
    assert att == {"loose": 1.0, "tight": 0.0}


def with_cell_fields(path: Path, policy: str, **fields) -> Path:
    data = json.loads(path.read_text())
    data["sweep"][0]["policies"][policy].update(fields)
    path.write_text(json.dumps(data))
    return path


def test_cell_time_speed_uses_the_time_weighted_ratios(tmp_path, cal_file):
    """`--speed cell-time` prices each replay by its `*_time_ratio`, not its median speed."""
    path = bench_json(tmp_path, {"autoregressive": 0.0}, speed={"autoregressive": 1.0})
    with_cell_fields(path, "autoregressive", verify_time_ratio=2.0)
    (row,) = run(path, cal_file, "--speed", "cell-time")["rows"]
    (median,) = run(path, cal_file, "--speed", "cell")["rows"]
    assert row["sim_speed"] == 2.0 and median["sim_speed"] == 1.0
    assert row["sim_tpot_p50_ms"] >= 2 * median["sim_tpot_p50_ms"]  # 2x steps, more queued


def test_trace_speed_replays_each_round_at_its_own_speed_over_time(tmp_path, cal_file):
    """`--speed trace`: every round of a cell is simulated with its own per-second speeds; a
    round at 2x everywhere at least doubles the simulated TPOT, and two rounds (1x and 2x)
    pooled land between.
    A trace whose rounds do not match the cell, or a cell without one, is an error."""
    tpot = {}
    cases = {
        "1x": [[1.0] * 40],
        "2x": [[2.0] * 40],
        "both": [[1.0], [2.0]],
    }
    for name, rounds in cases.items():
        path = bench_json(tmp_path, {"autoregressive": 0.0})
        with_cell_fields(path, "autoregressive", speed_trace={"verify": rounds})
        (row,) = run(path, cal_file, "--speed", "trace")["rows"]
        tpot[name] = row["sim_tpot_p50_ms"]
    assert tpot["2x"] >= 2 * tpot["1x"]
    assert tpot["1x"] < tpot["both"] < tpot["2x"]
    path = bench_json(tmp_path, {"autoregressive": 0.0})
    with pytest.raises(SystemExit, match="speed_trace"):
        run(path, cal_file, "--speed", "trace")
    with_cell_fields(path, "autoregressive", repeats=3, speed_trace={"verify": [[1.0], [1.0]]})
    data = json.loads(path.read_text())
    data["sweep"][0]["policies"]["autoregressive"]["baseline_tpot_ms"] = [4.0, 4.0, 4.0]
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="2 rounds, the cell 3"):
        run(path, cal_file, "--speed", "trace")
    bad = bench_json(tmp_path, {"autoregressive": 0.0})
    with_cell_fields(bad, "autoregressive", speed_trace={"verify": [[1.0, -2.0]]})
    with pytest.raises(SystemExit, match="bench.json: autoregressive at x2.0: field speed_trace"):
        run(bad, cal_file, "--speed", "trace")


def test_trace_of_replays_every_policy_at_one_policys_speeds(tmp_path, cal_file):
    """`--trace-of POLICY`: every policy at that policy's per-second speeds (the same machine
    minute for all); it needs `--speed trace` and a policy the run has."""
    path = bench_json(tmp_path, {"autoregressive": 0.0, "sarathi": 0.0})
    with_cell_fields(path, "autoregressive", speed_trace={"verify": [[1.0] * 40]})
    with_cell_fields(path, "sarathi", speed_trace={"verify": [[2.0] * 40]})
    own = {r["policy"]: r for r in run(path, cal_file, "--speed", "trace")["rows"]}
    out = run(path, cal_file, "--speed", "trace", "--trace-of", "autoregressive")
    same = {r["policy"]: r for r in out["rows"]}
    assert out["trace_of"] == "autoregressive"
    assert same["autoregressive"]["sim_tpot_p50_ms"] == own["autoregressive"]["sim_tpot_p50_ms"]
    # sarathi at autoregressive's 1x instead of its own 2x
    assert same["sarathi"]["sim_tpot_p50_ms"] * 2 <= own["sarathi"]["sim_tpot_p50_ms"]
    with pytest.raises(SystemExit):
        run(path, cal_file, "--trace-of", "autoregressive")  # without --speed trace
    with pytest.raises(SystemExit):
        run(path, cal_file, "--speed", "trace", "--trace-of", "adaserve")  # not in the run


def test_jitter_scatters_the_simulated_calls_and_bad_files_are_errors(tmp_path, cal_file):
    """`--jitter FILE`: every simulated call also draws from a real machine's scatter around
    its speed (a slow outlier 1 in 3 calls here lengthens the TPOT tail, the mean step about
    the same); the output records the file. An unreadable or malformed file is an error
    naming it."""
    path = bench_json(tmp_path, {"autoregressive": 0.0})
    plain = run(path, cal_file)["rows"][0]
    jit = tmp_path / "jitter.json"
    jit.write_text(json.dumps({"verify": [0.5, 0.5, 2.0]}))
    out = run(path, cal_file, "--jitter", str(jit))
    assert out["jitter"] == str(jit)
    assert out["rows"][0]["sim_tpot_p50_ms"] != plain["sim_tpot_p50_ms"]
    for content in ("{", '{"verify": [0.0]}', '{"draft": [1.0]}', "[1.0]"):
        jit.write_text(content)
        with pytest.raises(SystemExit, match="--jitter .*jitter.json"):
            run(path, cal_file, "--jitter", str(jit))
    with pytest.raises(SystemExit, match="--jitter .*missing.json"):
        run(path, cal_file, "--jitter", str(tmp_path / "missing.json"))
    # 'local': the shipped sample of this machine (sim/jitter_local.json), every kind timed
    assert run(path, cal_file, "--jitter", "local")["jitter"] == "local"
    local = json.loads(
        (Path(__file__).parents[2] / "adaserve_jax/sim/jitter_local.json").read_text()
    )
    assert set(local) == {"verify", "draft", "expand"} and min(map(len, local.values())) > 100
    # 'cell': each replay's own recorded scatter; a cell without one is an error naming it
    with pytest.raises(SystemExit, match="autoregressive at x2.0: field speed_scatter"):
        run(path, cal_file, "--jitter", "cell")
    with_cell_fields(path, "autoregressive", speed_scatter={"verify": [0.5, 0.5, 2.0]})
    cell = run(path, cal_file, "--jitter", "cell")["rows"][0]
    jit.write_text(json.dumps({"verify": [0.5, 0.5, 2.0]}))
    assert (
        cell["sim_tpot_p50_ms"]
        == run(path, cal_file, "--jitter", str(jit))["rows"][0]["sim_tpot_p50_ms"]
    )


def test_jitter_memory_from_the_cell_or_the_flag(tmp_path, cal_file):
    """`--jitter cell` draws with each replay's recorded `speed_corr_ms` (0, independent draws,
    where the bench recorded none), `--jitter-corr-ms MS` overrides it; rows and output record
    what was used. The flag needs --jitter and a number >= 0; a malformed recorded field is an
    error naming it."""
    path = bench_json(tmp_path, {"autoregressive": 0.0})
    with_cell_fields(path, "autoregressive", speed_scatter={"verify": [0.5, 1.0, 1.5, 2.0]})
    iid = run(path, cal_file, "--jitter", "cell")
    assert iid["jitter_corr_ms"] is None and iid["rows"][0]["sim_jitter_corr_ms"] == 0.0
    forced = run(path, cal_file, "--jitter", "cell", "--jitter-corr-ms", "0")["rows"][0]
    assert forced["sim_tpot_p50_ms"] == iid["rows"][0]["sim_tpot_p50_ms"]
    with_cell_fields(path, "autoregressive", speed_corr_ms=500.0)
    own = run(path, cal_file, "--jitter", "cell")["rows"][0]
    assert own["sim_jitter_corr_ms"] == 500.0
    assert own["sim_tpot_p50_ms"] != iid["rows"][0]["sim_tpot_p50_ms"]
    flag = run(path, cal_file, "--jitter", "cell", "--jitter-corr-ms", "500")
    assert flag["jitter_corr_ms"] == 500.0 and flag["rows"][0] == own
    with pytest.raises(SystemExit):
        run(path, cal_file, "--jitter-corr-ms", "20")  # without --jitter
    with pytest.raises(SystemExit):
        run(path, cal_file, "--jitter", "cell", "--jitter-corr-ms", "-1")
    with_cell_fields(path, "autoregressive", speed_corr_ms=-3)
    with pytest.raises(SystemExit, match="autoregressive at x2.0: field speed_corr_ms"):
        run(path, cal_file, "--jitter", "cell")


def test_gap_summary_per_policy_and_overall():
    from adaserve_jax.sim.validate import gap_summary

    rows = [
        {"policy": "a", "attainment_gap_pp": 4.0},
        {"policy": "a", "attainment_gap_pp": -8.0},
        {"policy": "b", "attainment_gap_pp": 5.0},
    ]
    s = gap_summary(rows)
    assert s["a"] == {"mean_abs_gap_pp": 6.0, "within_5pp": 1, "points": 2}
    assert s["b"] == {"mean_abs_gap_pp": 5.0, "within_5pp": 1, "points": 1}
    assert s["all"] == {"mean_abs_gap_pp": 17.0 / 3, "within_5pp": 2, "points": 3}


def test_per_load_baseline_sets_the_points_slos(tmp_path, cal_file):
    """A `--baseline per-load` bench records each load's baseline on its point; the simulator
    replays that load at it: loose, every SLO met; tight, none."""
    att = {}
    for name, base in (("loose", 40.0), ("tight", 0.5)):
        path = bench_json(tmp_path, {"autoregressive": 0.0})
        data = json.loads(path.read_text())
        data["sweep"][0]["baseline_tpot_ms"] = base
        path.write_text(json.dumps(data))
        (row,) = run(path, cal_file)["rows"]
        att[name] = row["sim_attainment"]
    assert att == {"loose": 1.0, "tight": 0.0}


def test_jitter_pools_the_benches_scatter_per_kind(tmp_path):
    """`python -m adaserve_jax.sim.jitter`: every cell's speed_scatter quantiles pooled per
    kind (a kind no cell timed is left out), written as validate --jitter's JSON; benches
    without any verify scatter are an error naming them."""
    from adaserve_jax.sim.jitter import main as jitter_main

    def bench(cells):
        path = tmp_path / f"b{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"sweep": [{"time_scale": 1.0, "policies": cells}]}))
        return str(path)

    a = bench({"ar": {"speed_scatter": {"verify": [0.9, 1.0, 1.2], "draft": None}}})
    b = bench({"ada": {"speed_scatter": {"verify": [0.8, 1.1], "expand": [1.0, 1.5]}}})
    out = tmp_path / "jitter.json"
    pooled = jitter_main([a, b, "--json", str(out)])
    assert pooled == {"verify": [0.8, 0.9, 1.0, 1.1, 1.2], "expand": [1.0, 1.5]}
    assert json.loads(out.read_text()) == pooled
    with pytest.raises(SystemExit, match="no cell records speed_scatter"):
        jitter_main([bench({"ar": {"speed_trace": {}}})])
    with pytest.raises(SystemExit, match="missing.json"):
        jitter_main([str(tmp_path / "missing.json")])
