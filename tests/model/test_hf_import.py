"""load_hf_dir against transformers: logits and greedy tokens of small random Llama / Qwen2."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[test]')")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install '.[test]')"
)
from safetensors.numpy import load_file, save_file  # noqa: E402

from adaserve_jax.model.hf_import import load_hf_dir  # noqa: E402
from adaserve_jax.model.llama import forward_causal, init_params  # noqa: E402

VOCAB = 256
SEQ = 64  # logits are compared on [2, SEQ]; greedy runs PROMPT + NEW_TOKENS == SEQ
PROMPT = 32
NEW_TOKENS = 32
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,  # wider logits than the default 0.02: fewer near-ties in greedy
    bos_token_id=1,
    eos_token_id=2,
)
VARIANTS = {
    # sharded save (index.json), several eos ids
    "llama": ("llama", dict(eos_token_id=[2, 3]), "20KB"),
    "llama_tied_head_dim": (
        "llama",
        dict(tie_word_embeddings=True, head_dim=32, rope_theta=5e5),
        None,
    ),
    "llama_attention_bias": ("llama", dict(attention_bias=True, rms_norm_eps=1e-5), None),
    "qwen2": ("qwen2", dict(rope_theta=1e6), None),
}
_forward = jax.jit(forward_causal, static_argnums=1)


def _build(kind: str, overrides: dict, seed: int = 0):
    """A random float32 HF model; norms and q/k/v biases perturbed so their mapping matters."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(**{**BASE, **overrides})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**{**BASE, **overrides})
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.copy_(0.2 * torch.randn_like(param))
            elif name.endswith("o_proj.bias"):
                param.zero_()  # our decoder has no o_proj bias; the importer requires zeros
    return model.eval()


def _save(model, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
    kind, overrides, shard = VARIANTS[request.param]
    model = _build(kind, overrides)
    path = _save(model, tmp_path_factory.mktemp(request.param), shard)
    if shard is not None:
        assert (path / "model.safetensors.index.json").is_file()
    cfg, params = load_hf_dir(path)
    return request.param, model, cfg, params


def test_config_and_tree_structure(imported):
    name, model, cfg, params = imported
    hf = model.config
    assert cfg.num_layers == hf.num_hidden_layers and cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == (32 if name == "llama_tied_head_dim" else 16)
    assert cfg.tie_embeddings == (name == "llama_tied_head_dim")
    assert cfg.qkv_bias == (name in ("llama_attention_bias", "qwen2"))
    assert cfg.rope_theta == {"llama_tied_head_dim": 5e5, "qwen2": 1e6}.get(name, 1e4)
    assert cfg.max_seq_len == 128 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2
    expected = jax.eval_shape(lambda: init_params(cfg))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected)
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32


def test_logits_match_transformers(imported):
    name, model, cfg, params = imported
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ), dtype=np.int32)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens).long()).logits.numpy()
    got = np.asarray(_forward(params, cfg, tokens))
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |logit diff| = {diff:.3g} (max |logit| {np.abs(want).max():.3g})")
    assert diff <= 1e-4


def test_greedy_matches_generate(imported):
    _, model, cfg, params = imported
    prompt = np.random.default_rng(2).integers(3, VOCAB, (2, PROMPT), dtype=np.int32)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    want = out[:, PROMPT:].numpy()
    # Naive greedy loop over a fixed [2, SEQ] buffer (one compile; causal, so the zero
    # padding after position t does not change logits[t]). Like min_new_tokens, eos ids
    # are never picked.
    params = jax.device_put(params)
    buf = np.zeros((2, SEQ), np.int32)
    buf[:, :PROMPT] = prompt
    for t in range(PROMPT, PROMPT + NEW_TOKENS):
        logits = np.asarray(_forward(params, cfg, buf))[:, t - 1].copy()
        logits[:, eos] = -np.inf
        buf[:, t] = logits.argmax(-1)
    assert want.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(buf[:, PROMPT:], want)


# ---- bad input ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return _build("llama", dict(attention_bias=True), seed=3)


@pytest.fixture
def good_dir(small_model, tmp_path):
    return _save(small_model, tmp_path / "hf")


def _raises_naming(path: Path, pattern: str = ""):
    """pytest.raises(ValueError) whose message names `path` (by its file name) and `pattern`."""
    return pytest.raises(ValueError, match=re.escape(path.name) + ".*" + pattern)


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_good_dir_loads(good_dir):
    cfg, _ = load_hf_dir(good_dir)
    assert cfg.qkv_bias and not cfg.tie_embeddings


def test_missing_dir(tmp_path):
    with _raises_naming(tmp_path / "nope", "does not exist"):
        load_hf_dir(tmp_path / "nope")


def test_dir_without_config(good_dir):
    (good_dir / "config.json").unlink()
    with _raises_naming(good_dir / "config.json", "missing"):
        load_hf_dir(good_dir)


def test_config_not_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with _raises_naming(good_dir / "config.json", "cannot read"):
        load_hf_dir(good_dir)


def test_unknown_architecture(good_dir):
    _edit_config(good_dir, architectures=["MistralForCausalLM"])
    with _raises_naming(good_dir / "config.json", "architectures"):
        load_hf_dir(good_dir)


@pytest.mark.parametrize(
    "changes",
    [
        dict(rope_scaling={"type": "linear", "factor": 2.0}),
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
        dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
        dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
    ],
    ids=["rope_scaling", "rope_parameters", "per_layer_type", "partial_rotary"],
)
def test_unsupported_rope_scaling(good_dir, changes):
    _edit_config(good_dir, **changes)
    with _raises_naming(good_dir / "config.json", "rope"):
        load_hf_dir(good_dir)


def test_null_rope_scaling_and_legacy_rope_theta(good_dir):
    _edit_config(good_dir, rope_scaling=None, rope_parameters=None, rope_theta=123.0)
    cfg, _ = load_hf_dir(good_dir)
    assert cfg.rope_theta == 123.0


@pytest.mark.parametrize("garbage", [b"not a safetensors file", "truncate"])
def test_corrupt_safetensors(good_dir, garbage):
    file = good_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if garbage == "truncate" else garbage)
    with _raises_naming(file, "safetensors"):
        load_hf_dir(good_dir)


def test_no_safetensors(good_dir):
    (good_dir / "model.safetensors").unlink()
    with _raises_naming(good_dir, "no \\*.safetensors"):
        load_hf_dir(good_dir)


def test_wrong_shape(good_dir):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(tensors):
        tensors[name] = tensors[name][:, :32].copy()

    _edit_tensors(good_dir, edit)
    with _raises_naming(good_dir / "model.safetensors", f"{name} has shape \\(64, 32\\)"):
        load_hf_dir(good_dir)


def test_missing_tensor(good_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(good_dir, lambda tensors: tensors.pop(name))
    with _raises_naming(good_dir / "model.safetensors", f"missing tensor {name}"):
        load_hf_dir(good_dir)


def test_unexpected_tensor(good_dir):
    _edit_config(good_dir, num_hidden_layers=1)
    with _raises_naming(good_dir / "model.safetensors", "unexpected tensor model.layers.1"):
        load_hf_dir(good_dir)


def test_nonzero_o_proj_bias(good_dir):
    name = "model.layers.0.self_attn.o_proj.bias"

    def edit(tensors):
        tensors[name] = np.ones_like(tensors[name])

    _edit_tensors(good_dir, edit)
    with _raises_naming(good_dir / "model.safetensors", f"{name} is non-zero"):
        load_hf_dir(good_dir)


def test_tied_lm_head_must_equal_embedding(good_dir):
    _edit_config(good_dir, tie_word_embeddings=True)
    embed = "model.embed_tokens.weight"
    _edit_tensors(good_dir, lambda tensors: tensors.update({"lm_head.weight": tensors[embed]}))
    cfg, params = load_hf_dir(good_dir)  # stored but identical: fine
    assert cfg.tie_embeddings and "lm_head" not in params

    def edit(tensors):
        tensors["lm_head.weight"] = tensors[embed] + 1.0

    _edit_tensors(good_dir, edit)
    with _raises_naming(good_dir / "model.safetensors", "lm_head.weight differs"):
        load_hf_dir(good_dir)


def test_missing_shard(small_model, tmp_path):
    path = _save(small_model, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    load_hf_dir(path)
    shards[-1].unlink()
    with _raises_naming(shards[-1], "missing"):
        load_hf_dir(path)


def test_bfloat16_weights(small_model, tmp_path):
    path = _save(copy.deepcopy(small_model).to(torch.bfloat16), tmp_path / "bf16")
    _, params = load_hf_dir(path)
    want = small_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params["embed_tokens"], want)
