"""Trainer: schedule, deterministic batches, distillation loss, resumable orbax checkpoints."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaserve_jax import train as tr
from adaserve_jax.model.checkpoint import load_model_dir
from adaserve_jax.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig.tiny(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, max_seq_len=64
)


def _data() -> tr.TokenData:
    rng = np.random.default_rng(0)
    code = rng.integers(0, 64, 4000).astype(np.uint16)
    prose = rng.integers(0, 64, 2000).astype(np.uint16)
    return tr.TokenData((code, prose), (0.7, 0.3), rng.integers(0, 64, 200).astype(np.uint16))


def _tc(tmp_path, **kw) -> tr.TrainConfig:
    base = dict(
        steps=6,
        batch_size=2,
        seq_len=32,
        short_seq_len=32,
        warmup_steps=2,
        eval_every=100,
        eval_windows=2,
        ckpt_every=3,
        run_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "export"),
    )
    base.update(kw)
    return tr.TrainConfig(**base)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_schedule_warmup_hold_cosine():
    tc = tr.TrainConfig(steps=100, lr=1e-3, warmup_steps=10, decay_frac=0.3, min_lr_ratio=0.1)
    assert tc.decay_start == 70
    assert float(tc.lr_at(0)) == 0.0 and float(tc.lr_at(5)) == pytest.approx(5e-4)
    assert float(tc.lr_at(10)) == pytest.approx(1e-3) and float(tc.lr_at(69)) == pytest.approx(1e-3)
    assert float(tc.lr_at(100)) == pytest.approx(1e-4)
    assert tc.shape_at(69) == (16, 256) and tc.shape_at(70) == (4, 1024)
    with pytest.raises(ValueError, match="teacher_dir"):
        tr.TrainConfig(distill_alpha=0.5)


def test_batches_are_a_function_of_seed_and_step():
    data = _data()
    a = tr.sample_batch(data, 0, 7, 4, 16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, tr.sample_batch(data, 0, 7, 4, 16))
    assert not np.array_equal(a, tr.sample_batch(data, 0, 8, 4, 16))


def test_distillation_kl_is_zero_against_itself():
    params = tr._init_params(CFG, 0)
    batch = jnp.asarray(tr.sample_batch(_data(), 0, 0, 2, 16))
    losses = jax.jit(lambda p, b: tr._losses(CFG, p, b, CFG, p, 0.5))
    total, ce, kl = losses(params, batch)
    assert abs(float(kl)) < 1e-5
    assert float(total) == pytest.approx(0.5 * float(ce), rel=1e-4, abs=1e-5)


def test_resume_continues_with_identical_params(tmp_path):
    data = _data()
    full = tr.train(CFG, _tc(tmp_path), data, progress=False)
    ckpt = tmp_path / "run" / tr.CKPT_SUBDIR
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["3", "6"]
    # Simulate a run killed after its step-3 checkpoint; a half-written later step is present.
    shutil.rmtree(ckpt / "6")
    partial = ckpt / "6.orbax-checkpoint-tmp-1700000000"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    mgr = tr.open_manager(tmp_path / "run", _tc(tmp_path))
    assert mgr.latest_step() == 3  # the partial directory is never taken as latest
    mgr.close()
    resumed = tr.train(CFG, _tc(tmp_path), data, progress=False)
    for x, y in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    cfg, exported = load_model_dir(tmp_path / "export")
    assert cfg == CFG
    for x, y in zip(_leaves(full), _leaves(exported), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_resume_with_another_shape_errors(tmp_path):
    data = _data()
    tr.train(CFG, _tc(tmp_path, steps=3), data, progress=False)
    other = dataclasses.replace(CFG, hidden_size=48, head_dim=12)
    with pytest.raises(ValueError, match="another shape"):
        tr.train(other, _tc(tmp_path, steps=3), data, progress=False)
    # Even without the pinned config file the orbax restore is checked.
    (tmp_path / "run" / tr.RUN_CONFIG).unlink()
    with pytest.raises(ValueError, match="does not match"):
        tr.train(other, _tc(tmp_path, steps=3), data, progress=False)


def test_empty_data_and_missing_corpus_error(tmp_path):
    empty = np.zeros(0, np.uint16)
    with pytest.raises(ValueError, match="empty"):
        tr.TokenData((empty,), (1.0,), np.arange(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="empty"):
        tr.TokenData((np.arange(10, dtype=np.uint16),), (1.0,), empty)
    with pytest.raises(SystemExit, match="tokenizer not found"):
        tr.main(["--tokenizer", str(tmp_path / "none.json"), "--run-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="manifest not found"):
        tr.main(
            [
                "--manifest",
                str(tmp_path / "none.json"),
                "--tokenizer",
                str(REPO / "checkpoints" / "tokenizer.json"),
                "--run-dir",
                str(tmp_path / "r"),
            ]
        )


def test_embedding_init_from_teacher_keeps_token_geometry():
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(64, 8)) @ rng.normal(size=(8, 64))  # rank 8 <= student width
    teacher = {"embed_tokens": jnp.asarray(low_rank, jnp.float32)}
    other = {"norm": {"weight": jnp.ones(32)}}
    student_init = {"embed_tokens": jnp.asarray(rng.normal(0, 0.02, (64, 32)), jnp.float32)}
    student = tr.embed_init_from_teacher({**student_init, **other}, teacher)
    assert student["norm"] is other["norm"]
    e_s = np.asarray(student["embed_tokens"], np.float64)
    assert e_s.shape == (64, 32)
    centred = low_rank - low_rank.mean(axis=0)
    gram_t, gram_s = centred @ centred.T, (e_s - e_s.mean(axis=0)) @ (e_s - e_s.mean(axis=0)).T
    np.testing.assert_allclose(gram_s / gram_s.max(), gram_t / gram_t.max(), atol=1e-4)


def test_init_from_warm_starts_from_a_finished_run(tmp_path):
    data = _data()
    first = tr.train(CFG, _tc(tmp_path / "a", steps=3, lr=1e-2), data, progress=False)
    # one step at a tiny learning rate: the params stay next to the warm start, far from a
    # fresh random init
    tc = _tc(tmp_path / "b", steps=1, warmup_steps=0, lr=1e-7, init_from=str(tmp_path / "a/export"))
    cont = tr.train(CFG, tc, data, progress=False)
    for x, y in zip(_leaves(first), _leaves(cont), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    fresh_tc = dataclasses.replace(tc, init_from=None, run_dir=str(tmp_path / "c"))
    fresh = tr.train(CFG, fresh_tc, data, progress=False)
    pairs = zip(_leaves(first), _leaves(fresh), strict=True)
    assert max(float(np.abs(x - y).max()) for x, y in pairs) > 1e-3  # >> the 1e-5 above
    other = dataclasses.replace(CFG, hidden_size=48, head_dim=12)
    with pytest.raises(ValueError, match="init-from"):
        tr.train(other, dataclasses.replace(tc, run_dir=str(tmp_path / "d")), data, progress=False)


def test_continued_presets_chain_onto_the_base_runs():
    """target -> draft -> target-cont -> draft-cont: each continuation warm-starts from what
    its base preset exports (same model shape), and the draft distils from the target's."""
    for base, cont in (("target", "target-cont"), ("draft", "draft-cont")):
        (base_cfg, base_tc), (cont_cfg, cont_tc) = tr.PRESETS[base], tr.PRESETS[cont]
        assert cont_cfg() == base_cfg()
        assert cont_tc.init_from == base_tc.export_dir == cont_tc.export_dir
        assert cont_tc.run_dir != base_tc.run_dir  # a new schedule, not a resume
    assert tr.PRESETS["draft-cont"][1].teacher_dir == tr.PRESETS["target-cont"][1].export_dir
