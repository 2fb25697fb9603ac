"""Trace loading, validation errors and arrival scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaserve_jax.bench.workload import (
    WorkloadError,
    arrival_times_s,
    load_workload,
    offered_rps,
    slo_multiple,
    take,
)


def entry(t=0.0, ratio=1.2, **kw):
    base = dict(
        emission_time_ms=t, input_length=5, output_length=256, prompt="def f():", slo_ratio=ratio
    )
    base.update(kw)
    return base


def write(tmp_path, data, name="trace.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_sorts_and_categorizes(tmp_path):
    path = write(tmp_path, [entry(500.0, -150), entry(0.0, 1.2), entry(250.0, -50)])
    entries = load_workload(path)
    assert [e.index for e in entries] == [1, 2, 0]
    assert [e.category for e in entries] == ["coding", "chat", "summarization"]
    assert [e.slo_multiple for e in entries] == pytest.approx([1.2, 50 / 30, 5.0])


def test_slo_multiples_match_engine_categories():
    from adaserve_jax.api import SLO_CATEGORIES

    assert slo_multiple(1.2) == pytest.approx(SLO_CATEGORIES["coding"])
    assert slo_multiple(-50) == pytest.approx(SLO_CATEGORIES["chat"])
    assert slo_multiple(-150) == pytest.approx(SLO_CATEGORIES["summarization"])


@pytest.mark.parametrize(
    "data, needles",
    [
        ({"requests": []}, ["expected a JSON list", "dict"]),
        ([], ["no requests"]),
        ("[1, 2", ["not valid JSON"]),
        ([entry(), 7], ["entry 1", "expected an object"]),
        ([entry(), {k: v for k, v in entry().items() if k != "prompt"}], ["entry 1", "'prompt'"]),
        ([entry(-1.0)], ["entry 0", "'emission_time_ms'", ">= 0"]),
        ([entry(), entry(ratio=2.0)], ["entry 1", "'slo_ratio'", "unknown"]),
        ([entry(t="soon")], ["entry 0", "'emission_time_ms'", "'soon'"]),
        ([entry(output_length=12.5)], ["entry 0", "'output_length'", "integer"]),
        ([entry(output_length=0)], ["entry 0", "'output_length'", "> 0"]),
        ([entry(input_length=True)], ["entry 0", "'input_length'"]),
        ([entry(ratio="1.2")], ["entry 0", "'slo_ratio'", "number"]),
        ([entry(t=float("nan"))], ["entry 0", "'emission_time_ms'"]),
        ([entry(prompt="")], ["entry 0", "'prompt'"]),
    ],
)
def test_malformed_trace_names_file_index_field(tmp_path, data, needles):
    path = write(tmp_path, data, "bad_trace.json")
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    msg = str(err.value)
    assert "bad_trace.json" in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="nope.json"):
        load_workload(tmp_path / "nope.json")


def test_arrival_scaling_and_take(tmp_path):
    path = write(tmp_path, [entry(1000.0 + 300.0 * i) for i in range(5)])
    entries = take(load_workload(path), 3)
    assert len(entries) == 3
    # baseline 15 ms = half the paper's 30 ms; time-scale 2 -> net factor 1
    got = arrival_times_s(entries, baseline_tpot_ms=15.0, time_scale=2.0)
    np.testing.assert_allclose(got, [0.0, 0.3, 0.6])
    got = arrival_times_s(entries, baseline_tpot_ms=3.0, time_scale=0.5)
    np.testing.assert_allclose(got, [0.0, 0.015, 0.03])
    assert offered_rps(got) == pytest.approx(2 / 0.03)
    with pytest.raises(ValueError, match="time_scale"):
        arrival_times_s(entries, 3.0, 0.0)
    with pytest.raises(ValueError, match="num_requests"):
        take(entries, 0)


def test_shared_traces_parse():
    from pathlib import Path

    root = Path("/work/shared/workloads/adaserve-artifact")
    if not root.is_dir():
        pytest.skip("shared traces not present")
    for path in sorted(root.glob("rps*_ol256.json")):
        entries = load_workload(path)
        assert {e.category for e in entries} == {"coding", "chat", "summarization"}
