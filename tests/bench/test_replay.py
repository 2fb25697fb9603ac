"""End-to-end replay on a tiny random model pair, and CLI input errors before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import adaserve_jax.bench.replay as replay_module
from adaserve_jax import ModelConfig
from adaserve_jax.bench.__main__ import main
from adaserve_jax.bench.replay import build_requests, run_sweep
from adaserve_jax.bench.workload import arrival_times_s, load_workload, offered_rps
from adaserve_jax.model import init_params
from adaserve_jax.model.checkpoint import save_model_dir
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.request import Request

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "checkpoints" / "tokenizer.json"
PROMPTS = {
    1.2: "def add(a, b):\n    return a + b\n",
    -50: "Give three tips for staying healthy.",
    -150: "Please generate a summarization for the following document.\n\nThe cat sat. " * 20,
}


def trace(n: int = 6) -> list[dict]:
    ratios = list(PROMPTS)
    return [
        dict(
            emission_time_ms=100.0 * i,
            input_length=10,
            output_length=256,
            prompt=PROMPTS[ratios[i % 3]],
            slo_ratio=ratios[i % 3],
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory) -> Path:
    if not TOKENIZER.is_file():
        pytest.skip("checkpoints/tokenizer.json missing")
    root = tmp_path_factory.mktemp("pair")
    shutil.copy(TOKENIZER, root / "tokenizer.json")
    configs = {
        "target": ModelConfig.tiny(vocab_size=8192, eos_token_id=None),
        "draft": ModelConfig.tiny(vocab_size=8192, eos_token_id=None, hidden_size=32, num_layers=1),
    }
    for seed, (name, cfg) in enumerate(configs.items()):
        params = jax.tree.map(lambda x: np.asarray(x) * 4.0, init_params(cfg, seed))
        save_model_dir(root / name, params, cfg)
    return root


def test_end_to_end_replay(model_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADASERVE_JAX_PROFILES", str(tmp_path / "profiles"))
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    out, plot = tmp_path / "res.json", tmp_path / "res.png"
    # tiny model's baseline ~1 ms: x30 makes the arrivals span about the trace's 0.5 s.
    # Budget 32 < largest bucket 64: adaserve's draft catch-up can exceed the verify budget.
    main(
        [
            "--workload", str(workload), "--target", str(model_pair / "target"),
            "--draft", str(model_pair / "draft"), "--policy", "autoregressive",
            "--policy", "adaserve", "--num-requests", "6", "--max-output-len", "12",
            "--time-scale", "30", "--baseline", "measured", "--max-batch", "4",
            "--token-buckets", "1,4,16,64", "--ctx-buckets", "64,256", "--json", str(out),
            "--plot", str(plot), "--no-progress", "--token-budget", "32",
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    assert isinstance(result["baseline_tpot_ms"], float) and result["baseline_tpot_ms"] > 0
    assert result["settings"]["baseline"] == "measured"
    assert set(result["policies"]) == {"autoregressive", "adaserve"}
    for name, p in result["policies"].items():
        assert p["requests"] == 6, name  # every request completed
        assert p["failed"] == 0
        for key in ("attainment", "violations", "goodput_tokens_per_s", "mean_accepted_per_step"):
            assert isinstance(p[key], float), (name, key)
        assert 0.0 <= p["attainment"] <= 1.0
        assert p["violations"] == pytest.approx(1.0 - p["attainment"])
        assert set(p["per_category"]) == {"coding", "chat", "summarization"}
        for c in p["per_category"].values():
            assert isinstance(c["attainment"], float) and c["requests"] == 2
        assert p["output_tokens"] == 6 * 12  # no EOS in the tiny model
        assert p["ttft_p50_ms"] is not None and p["tpot_p99_ms"] is not None
        # scheduler Python per iteration: positive, and a fraction of the whole iteration
        iteration_ms = 1e3 * p["wall_s"] / p["iterations"]
        assert 0.0 < p["host_ms_per_iteration"] < iteration_ms, name
        # the machine's speed against its profile while this policy ran: a positive ratio
        # near 1 (the profile was measured minutes ago on the same machine)
        assert 0.2 < p["verify_speed"] < 5.0, name
        # time-weighted, and per second of the replay (one round): every second of a
        # replay that decodes all along has verify calls, and their ratios pool to the total
        assert 0.2 < p["verify_time_ratio"] < 5.0, name
        (per_s,) = p["speed_trace"]["verify"]
        assert int(p["wall_s"] - 0.5) + 1 <= len(per_s) <= int(p["wall_s"]) + 1, name
        assert all(x is None or 0.1 < x < 10.0 for x in per_s), name
        # each verify call over its second's ratio: 51 ascending quantiles around 1
        scatter = p["speed_scatter"]["verify"]
        assert len(scatter) == 51 and scatter == sorted(scatter), name
        assert scatter[0] <= 1.0 <= scatter[-1] and 0.5 < scatter[25] < 2.0, name
        # the scatter's memory (bench/speed_memory.py): a time constant, finite and >= 0
        assert 0.0 <= p["speed_corr_ms"] < 1e4, name
    # the draft's calls are priced the same way, for the speculative policy only
    ar, ada = result["policies"]["autoregressive"], result["policies"]["adaserve"]
    assert ar["draft_speed"] is None and ar["expand_speed"] is None
    assert ar["draft_time_ratio"] is None and ar["speed_trace"]["draft"] == [[]]
    assert ar["speed_scatter"]["draft"] is None and len(ada["speed_scatter"]["draft"]) == 51
    assert 0.2 < ada["draft_speed"] < 5.0 and 0.2 < ada["expand_speed"] < 5.0
    # the recorded profile prices the adaserve expansion call for the simulator's validation
    assert list(result["settings"]["latency_profile"]["expand_ms"]) == ["4,1,2"]
    assert result["policies"]["autoregressive"]["mean_accepted_per_step"] == 1.0
    assert result["policies"]["adaserve"]["mean_accepted_per_step"] >= 1.0
    assert "attainment" in capsys.readouterr().out


def test_unknown_policy_fails_before_any_work(tmp_path, capsys):
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(2)))
    with pytest.raises(SystemExit) as err:
        main(["--workload", str(workload), "--policy", "adaserve", "--policy", "fastest"])
    assert err.value.code == 2
    assert "unknown policy 'fastest'" in capsys.readouterr().err


def test_malformed_workload_fails_before_loading_models(tmp_path):
    bad = trace(3)
    del bad[2]["slo_ratio"]
    workload = tmp_path / "broken.json"
    workload.write_text(json.dumps(bad))
    with pytest.raises(SystemExit) as err:
        main(["--workload", str(workload), "--target", str(tmp_path / "no-such-model")])
    msg = str(err.value.code)
    assert "broken.json" in msg and "entry 2" in msg and "'slo_ratio'" in msg


class FakeEngine:
    """Host-only stand-in: the target continues token t with t + 1 (no device, no jax)."""

    num_slots, max_len, has_draft, baseline_tpot_ms = 4, 512, False, 2.0
    tokenizer = object()

    def encode_prompt(self, prompt: str) -> list[int]:
        return [ord(c) % 97 + 1 for c in prompt]

    def make_request(self, ids, *, max_tokens, request_id, category, tpot_slo_ms, **_):
        return Request(
            request_id, tuple(ids), max_tokens, tpot_slo_ms=tpot_slo_ms, category=category
        )

    def forward(self, segments, moves=()):
        tokens = np.concatenate([s.tokens for s in segments])
        offsets = tuple(int(x) for x in np.cumsum([0] + [len(s) for s in segments])[:-1])
        return (tokens + 1) % 1000, offsets

    def _scheduler(self, policy, **kwargs):
        if policy == "sarathi":
            raise RuntimeError("boom")
        return Scheduler(self, policy=policy, **kwargs)


class SarathiToo(FakeEngine):
    """`FakeEngine` on which sarathi runs too."""

    def _scheduler(self, policy, **kwargs):
        return Scheduler(self, policy=policy, **kwargs)


def test_sweep_on_fake_engine_records_a_failing_policy_and_goes_on(tmp_path):
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    entries = load_workload(workload)
    engine = FakeEngine()
    requests = build_requests(engine, entries, max_output_len=5, max_prompt_len=8)
    assert all(len(r.prompt_ids) <= 8 and r.max_tokens == 5 for r in requests)
    slos = {r.category: r.tpot_slo_ms for r in requests}
    assert slos == pytest.approx({"coding": 2.4, "chat": 2.0 * 50 / 30, "summarization": 10.0})
    saved = []
    sweep = run_sweep(
        engine, entries, requests, ["autoregressive", "sarathi"], [0.01], progress=False,
        log=lambda *a, **k: None, on_run=saved.append,
    )  # fmt: skip
    assert len(saved) == 2
    pols = sweep[0]["policies"]
    assert pols["sarathi"] == {"error": "RuntimeError: boom"}
    ar = pols["autoregressive"]
    assert ar["requests"] == 6 and ar["output_tokens"] == 30 and ar["failed"] == 0
    assert ar["ttft_p50_ms"] >= 0.0 and ar["mean_accepted_per_step"] == 1.0


def test_sweep_repeats_take_turns_in_alternating_order_and_pool(tmp_path):
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    entries = load_workload(workload)

    class Recording(FakeEngine):
        order: list[str] = []

        def _scheduler(self, policy, **kwargs):
            self.order.append(policy)
            plain = policy if policy in ("autoregressive", "sarathi") else "autoregressive"
            return Scheduler(self, policy=plain, **kwargs)

    engine = Recording()
    requests = build_requests(engine, entries, max_output_len=5, max_prompt_len=8)
    sweep = run_sweep(
        engine, entries, requests, ["autoregressive", "sarathi"], [0.01], progress=False,
        log=lambda *a, **k: None, repeats=3,
    )  # fmt: skip
    ar, sa = "autoregressive", "sarathi"
    assert engine.order == [ar, sa, sa, ar, ar, sa]
    pols = sweep[0]["policies"]
    assert list(pols) == [ar, sa]  # the caller's order
    for s in pols.values():  # three rounds of the 6 requests, pooled
        assert s["repeats"] == 3 and s["requests"] == 18 and s["output_tokens"] == 90
        assert s["attainment"] is not None and s["failed"] == 0
    with pytest.raises(ValueError, match="repeats"):
        run_sweep(engine, entries, requests, [ar], [0.01], progress=False, repeats=0)
    # "cycle": the same order every round, every policy's rounds equally far apart
    engine.order.clear()
    run_sweep(
        engine, entries, requests, [ar, sa], [0.01], progress=False, log=lambda *a, **k: None,
        repeats=3, order="cycle",
    )  # fmt: skip
    assert engine.order == [ar, sa, ar, sa, ar, sa]
    # "rotate": each round starts one policy later (a third name, served plainly here)
    engine.order.clear()
    sp = "spec:2"
    run_sweep(
        engine, entries, requests, [ar, sa, sp], [0.01], progress=False,
        log=lambda *a, **k: None, repeats=4, order="rotate",
    )  # fmt: skip
    assert engine.order == [ar, sa, sp, sa, sp, ar, sp, ar, sa, ar, sa, sp]
    with pytest.raises(ValueError, match="order"):
        run_sweep(engine, entries, requests, [ar], [0.01], progress=False, order="random")


def test_sweep_per_run_baselines_rebuild_each_replay(tmp_path):
    """`rebaseline`: every replay gets its own baseline, SLOs and arrivals from it, and the
    summary records each round's baseline."""
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    entries = load_workload(workload)
    engine = FakeEngine()
    bases = iter([2.0, 3.0, 2.5, 4.0])
    built = []

    def requests_for(b):
        built.append(b)
        return build_requests(engine, entries, max_output_len=5, max_prompt_len=8,
                              baseline_tpot_ms=b)  # fmt: skip

    requests = requests_for(2.0)
    sweep = run_sweep(
        engine, entries, requests, ["autoregressive"], [0.01, 0.02], progress=False,
        log=lambda *a, **k: None, repeats=2, rebaseline=lambda: next(bases),
        requests_for=requests_for,
    )  # fmt: skip
    assert built == [2.0, 2.0, 3.0, 2.5, 4.0]
    first, second = (pt["policies"]["autoregressive"] for pt in sweep)
    assert first["baseline_tpot_ms"] == [2.0, 3.0] and second["baseline_tpot_ms"] == [2.5, 4.0]
    assert first["requests"] == 12 and second["requests"] == 12
    # arrivals scale with the baseline: a slower machine, a proportionally lower offered load
    want = np.mean([offered_rps(arrival_times_s(entries, b, 0.01)) for b in (2.0, 3.0)])
    assert first["offered_rps"] == pytest.approx(want)
    with pytest.raises(ValueError, match="go together"):
        run_sweep(engine, entries, requests, ["autoregressive"], [0.01], progress=False,
                  rebaseline=lambda: 2.0)  # fmt: skip


def _spied_sweep(engine, entries, requests, policies, scales, **kw):
    """`run_sweep` quietly, recording every replay's (policy, first request's TPOT SLO, last
    arrival)."""
    seen = []
    inner = replay_module.replay

    def spy(engine_, policy, reqs, arr, **kw_):
        seen.append((policy, reqs[0].tpot_slo_ms, float(arr[-1])))
        return inner(engine_, policy, reqs, arr, **kw_)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_module, "replay", spy)
        sweep = run_sweep(
            engine, entries, requests, policies, scales, progress=False,
            log=lambda *a, **k: None, **kw,
        )  # fmt: skip
    return sweep, seen


def test_sweep_per_load_baselines_are_shared_by_the_loads_replays(tmp_path):
    """`rebaseline_every="load"`: one baseline per time scale, measured before its replays;
    every round (and policy) at that scale replays the same requests and arrivals, and the
    point records the baseline (its SLOs: the categories' multiples of it)."""
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    entries = load_workload(workload)
    engine = FakeEngine()
    bases = iter([2.0, 3.0])
    built = []

    def requests_for(b):
        built.append(b)
        return build_requests(engine, entries, max_output_len=5, max_prompt_len=8,
                              baseline_tpot_ms=b)  # fmt: skip

    requests = requests_for(1.0)
    sweep, seen = _spied_sweep(
        engine, entries, requests, ["autoregressive"], [0.01, 0.02], repeats=2,
        rebaseline=lambda: next(bases), requests_for=requests_for, rebaseline_every="load",
    )  # fmt: skip
    assert built == [1.0, 2.0, 3.0]
    assert [pt["baseline_tpot_ms"] for pt in sweep] == [2.0, 3.0]
    assert len(seen) == 4  # 2 loads x 2 rounds, load by load
    for i, (pt, b) in enumerate(zip(sweep, (2.0, 3.0), strict=True)):
        arr = arrival_times_s(entries, b, pt["time_scale"])
        want = (requests_for(b)[0].tpot_slo_ms, pytest.approx(float(arr[-1])))
        assert all(x[1:] == want for x in seen[2 * i : 2 * i + 2])
        assert pt["offered_rps"] == pytest.approx(offered_rps(arr))
        for s in pt["policies"].values():
            assert "baseline_tpot_ms" not in s and s["requests"] == 12  # 2 rounds x 6
    with pytest.raises(ValueError, match="rebaseline_every"):
        run_sweep(
            engine, entries, requests, ["autoregressive"], [0.01], progress=False,
            rebaseline=lambda: 2.0, requests_for=requests_for, rebaseline_every="policy",
        )  # fmt: skip


def test_sweep_per_round_baselines_are_shared_by_the_rounds_policies(tmp_path):
    """`rebaseline_every="round"`: one baseline per round of a load, measured before the
    round; both policies of a round replay its requests and arrivals, the next round gets a
    new one, and each summary records its rounds' baselines."""
    workload = tmp_path / "trace.json"
    workload.write_text(json.dumps(trace(6)))
    entries = load_workload(workload)
    engine = SarathiToo()
    bases = iter([2.0, 3.0, 4.0, 5.0])

    def requests_for(b):
        return build_requests(engine, entries, max_output_len=5, max_prompt_len=8,
                              baseline_tpot_ms=b)  # fmt: skip

    policies = ["autoregressive", "sarathi"]
    sweep, seen = _spied_sweep(
        engine, entries, requests_for(1.0), policies, [0.01, 0.02], repeats=2, order="cycle",
        rebaseline=lambda: next(bases), requests_for=requests_for, rebaseline_every="round",
    )  # fmt: skip
    assert len(seen) == 8  # 2 loads x 2 rounds x 2 policies
    for i, b in enumerate((2.0, 3.0, 4.0, 5.0)):  # round i: both policies, baseline b
        scale = (0.01, 0.02)[i // 2]
        arr = arrival_times_s(entries, b, scale)
        want = (requests_for(b)[0].tpot_slo_ms, pytest.approx(float(arr[-1])))
        assert [x[0] for x in seen[2 * i : 2 * i + 2]] == policies
        assert all(x[1:] == want for x in seen[2 * i : 2 * i + 2])
    for pt, rounds in zip(sweep, ([2.0, 3.0], [4.0, 5.0]), strict=True):
        assert "baseline_tpot_ms" not in pt
        for s in pt["policies"].values():
            assert s["baseline_tpot_ms"] == rounds and s["requests"] == 12
