import json

import jax
import numpy as np
import pytest

from adaserve_jax import ModelConfig, load_model
from adaserve_jax.model import init_params
from adaserve_jax.model.checkpoint import save_model_dir


def test_orbax_roundtrip(tmp_path, tiny_model):
    path = save_model_dir(tmp_path / "m", tiny_model.params, tiny_model.config)
    m = load_model(path)
    assert m.config == tiny_model.config and m.tokenizer is None
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(tiny_model.params), strict=True):
        np.testing.assert_array_equal(a, b)
    ids = [1, 5, 9, 200]
    np.testing.assert_allclose(m.logits(ids), tiny_model.logits(ids), rtol=0, atol=0)
    assert m.logits(ids).shape == (4, 256) and m.logits(ids).dtype == np.float32


def test_missing_and_corrupt_directories(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an adaserve model directory"):
        load_model(tmp_path / "empty")
    path = save_model_dir(tmp_path / "m", tiny_model.params, tiny_model.config)
    (path / "model_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_config.json"):
        load_model(path)


def test_mismatched_shapes_name_the_tensor(tmp_path, tiny_model):
    path = save_model_dir(tmp_path / "m", tiny_model.params, tiny_model.config)
    cfg = json.loads((path / "model_config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="params"):
        load_model(path)


def test_unknown_config_field(tmp_path, tiny_model):
    path = save_model_dir(tmp_path / "m", tiny_model.params, tiny_model.config)
    cfg = json.loads((path / "model_config.json").read_text())
    cfg["mystery"] = 1
    (path / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown config fields"):
        load_model(path)


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(rope_theta=float("nan")), "rope_theta"),
        (dict(eos_token_id=999), "eos_token_id"),
    ],
)
def test_config_validation(override, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.tiny(**override)


def test_param_count_matches_tree():
    for cfg in (ModelConfig.tiny(), ModelConfig.tiny(qkv_bias=True, tie_embeddings=True)):
        n = sum(x.size for x in jax.tree.leaves(init_params(cfg)))
        assert n == cfg.num_params()
