"""bench.spread: the same sweep command run twice, attainment side by side."""

from __future__ import annotations

import json

import pytest

from adaserve_jax.bench.spread import main as spread_main

SETTINGS = {
    "workload": "w.json", "num_requests": 32, "max_output_len": 32,
    "policies": ["autoregressive", "adaserve"], "time_scales": [2.0, 1.0], "token_budget": 64,
    "baseline": "per-load",
}  # fmt: skip


def _sweep(tmp_path, name, att, **changed):
    data = {
        "settings": {**SETTINGS, **changed},
        "sweep": [
            {"time_scale": ts, "policies": {p: {"attainment": att[ts][p]} for p in att[ts]}}
            for ts in (2.0, 1.0)
        ],
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_spread_is_each_cells_range_over_the_runs(tmp_path):
    a = _sweep(tmp_path, "a", {2.0: {"autoregressive": 0.5, "adaserve": 0.75},
                               1.0: {"autoregressive": 0.25, "adaserve": 0.5}})  # fmt: skip
    b = _sweep(tmp_path, "b", {2.0: {"autoregressive": 0.625, "adaserve": 0.75},
                               1.0: {"autoregressive": 0.1875, "adaserve": 0.25}})  # fmt: skip
    out = spread_main([a, b, "--json", str(tmp_path / "out.json")])
    cells = {(p["time_scale"], p["policy"]): p for p in out["points"]}
    assert cells[2.0, "autoregressive"]["attainment"] == [50.0, 62.5]
    assert cells[2.0, "autoregressive"]["range_pp"] == 12.5
    assert cells[1.0, "adaserve"]["range_pp"] == 25.0
    assert out["mean_range_pp"] == {"autoregressive": 9.375, "adaserve": 12.5}
    assert json.loads((tmp_path / "out.json").read_text()) == out


def test_spread_refuses_runs_of_different_commands(tmp_path):
    att = {ts: {"autoregressive": 0.5, "adaserve": 0.5} for ts in (2.0, 1.0)}
    a = _sweep(tmp_path, "a", att)
    b = _sweep(tmp_path, "b", att, num_requests=64)
    with pytest.raises(SystemExit, match="num_requests"):
        spread_main([a, b])
    with pytest.raises(SystemExit):
        spread_main([a])  # one run has no spread
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        spread_main([a, str(bad)])
    with pytest.raises(SystemExit, match="not a sweep"):
        bad.write_text("[]")
        spread_main([a, str(bad)])
    missing = json.loads(open(a).read())
    del missing["sweep"][1]["policies"]["adaserve"]["attainment"]
    bad.write_text(json.dumps(missing))
    with pytest.raises(SystemExit, match="no attainment for adaserve at x1.0"):
        spread_main([a, str(bad)])
