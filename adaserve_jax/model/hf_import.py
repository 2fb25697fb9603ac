"""Import Hugging Face Llama / Qwen2 checkpoints as our `ModelConfig` + Flax params.

A Hugging Face directory holds:
    config.json                     architecture and shapes (`LlamaForCausalLM`, `Qwen2ForCausalLM`)
    model.safetensors               all weights, or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json   sharded weights

`load_hf_dir` maps `config.json` onto `ModelConfig`, derives the expected parameter tree
from `init_params` (shapes only, via `jax.eval_shape`), and fills every leaf from the
matching Hugging Face tensor: `model.layers.{i}.self_attn.q_proj.weight` [out, in] becomes
`layers_{i}/self_attn/q_proj/kernel` [in, out], norms and embeddings are copied as is.
The returned tree therefore has exactly `init_params(cfg)`'s structure.

Anything we cannot run faithfully (RoPE scaling, sliding-window attention, MLP biases,
a non-zero `o_proj` bias, quantised weights, ...) is rejected with a `ValueError` that
names the offending file, rather than silently producing a different model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from adaserve_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Buffers some older checkpoints saved alongside the weights; recomputed by our RoPE.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: str | Path) -> bool:
    """True when `path` looks like a Hugging Face model directory (has config.json)."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face Llama/Qwen2 directory -> (cfg, params as float32 numpy).

    `params` matches `init_params(cfg)`'s tree exactly. Raises ValueError naming the
    file and the problem on any missing, corrupt, unsupported or mismatched input.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise ValueError(f"{path}: Hugging Face model directory does not exist")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing Hugging Face {CONFIG_FILE}")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: config must be a JSON object")
    cfg, arch = config_from_hf(data, source=str(config_path))
    return cfg, _load_params(cfg, arch, _TensorSource(*_tensor_files(path)))


# ---- config.json -> ModelConfig ---------------------------------------------------------


def config_from_hf(data: dict[str, Any], *, source: str = CONFIG_FILE) -> tuple[ModelConfig, str]:
    """Map a Hugging Face config dict onto ModelConfig; returns (cfg, architecture name)."""

    def fail(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    def get_int(name: str, default: Any = None) -> Any:
        value = data.get(name, default)
        if value is None and default is None:
            raise fail(f"missing field {name!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail(f"field {name!r}={value!r} must be an int")
        return value

    arch = _architecture(data, fail)
    is_qwen2 = arch == "Qwen2ForCausalLM"

    if data.get("quantization_config") is not None:
        raise fail("field 'quantization_config': quantised checkpoints are not supported")
    hidden_act = data.get("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise fail(f"field 'hidden_act'={hidden_act!r} is not supported (only 'silu')")
    if data.get("mlp_bias", False):
        raise fail("field 'mlp_bias'=true is not supported")
    if data.get("use_sliding_window", False):
        raise fail("field 'use_sliding_window'=true is not supported (full attention only)")
    layer_types = data.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types)
    ):
        raise fail(f"field 'layer_types'={layer_types!r}: only 'full_attention' is supported")

    num_heads = get_int("num_attention_heads")
    num_kv_heads = data.get("num_key_value_heads")
    head_dim = data.get("head_dim")
    if is_qwen2:
        qkv_bias = True
    else:
        qkv_bias = data.get("attention_bias", False)
        if not isinstance(qkv_bias, bool):
            raise fail(f"field 'attention_bias'={qkv_bias!r} must be a bool")
    tie = data.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise fail(f"field 'tie_word_embeddings'={tie!r} must be a bool")

    fields = dict(
        vocab_size=get_int("vocab_size"),
        hidden_size=get_int("hidden_size"),
        intermediate_size=get_int("intermediate_size"),
        num_layers=get_int("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_heads if num_kv_heads is None else get_int("num_key_value_heads"),
        head_dim=0 if head_dim is None else get_int("head_dim"),
        max_seq_len=get_int("max_position_embeddings", 32768 if is_qwen2 else 2048),
        rope_theta=_rope_theta(data, fail),
        rms_norm_eps=_positive_float(data, "rms_norm_eps", 1e-6, fail),
        tie_embeddings=tie,
        qkv_bias=qkv_bias,
        bos_token_id=_token_id(data, "bos_token_id", fail),
        eos_token_id=_token_id(data, "eos_token_id", fail),
    )
    try:
        return ModelConfig(**fields), arch
    except ValueError as exc:
        raise fail(str(exc)) from exc


def _architecture(data: dict[str, Any], fail) -> str:
    archs = data.get("architectures")
    if archs is None:
        model_type = data.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise fail(
                f"no 'architectures' and field 'model_type'={model_type!r} is not one of "
                f"{sorted(_MODEL_TYPES)}"
            )
        return _MODEL_TYPES[model_type]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise fail(f"field 'architectures'={archs!r} is not one of {list(SUPPORTED_ARCHITECTURES)}")
    return archs[0]


def _rope_theta(data: dict[str, Any], fail) -> float:
    """rope_theta from the legacy (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`) form.

    Only plain RoPE is supported: `rope_scaling` must be null (or of type 'default').
    """
    theta = data.get("rope_theta", 10000.0)
    for name in ("rope_scaling", "rope_parameters"):
        rope = data.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise fail(f"field {name!r}={rope!r} must be an object or null")
        if any(isinstance(v, dict) for v in rope.values()):
            raise fail(f"field {name!r}: per-layer-type RoPE parameters are not supported")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise fail(f"field {name!r} has unsupported rope type {kind!r} ({rope!r})")
        partial = rope.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise fail(f"field {name!r}: partial_rotary_factor={partial!r} is not supported")
        theta = rope.get("rope_theta", theta)
    if data.get("partial_rotary_factor", 1.0) != 1.0:
        raise fail("field 'partial_rotary_factor' != 1 is not supported")
    return _positive_float({"rope_theta": theta}, "rope_theta", 10000.0, fail)


def _positive_float(data: dict[str, Any], name: str, default: float, fail) -> float:
    value = data.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise fail(f"field {name!r}={value!r} must be a finite number > 0")
    return float(value)


def _token_id(data: dict[str, Any], name: str, fail) -> int | None:
    """An int, null, or a list of ints (the first is kept, e.g. Llama 3's several eos ids)."""
    value = data.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise fail(f"field {name!r}={data.get(name)!r} must be an int, a list of ints or null")
    return value


# ---- safetensors -> params --------------------------------------------------------------


def _tensor_files(path: Path) -> tuple[list[Path], str]:
    """(safetensors files of the directory, label for "missing tensor" errors).

    Sharded checkpoints list their files in the index; otherwise every *.safetensors is read.
    """
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index_path}: cannot read shard index: {exc!r}") from exc
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{index_path}: bad shard file name {name!r}")
            if not (path / name).is_file():
                raise ValueError(f"{path / name}: shard listed in {INDEX_FILE} is missing")
            files.append(path / name)
        label = str(index_path)
    else:
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        label = str(files[0]) if len(files) == 1 else f"{path}/*.safetensors"
    if not files:
        raise ValueError(f"{path}: no *.safetensors weight files (only safetensors is supported)")
    return files, label


class _TensorSource:
    """Lazily opened safetensors files; `name -> file` for every tensor in the directory."""

    def __init__(self, files: list[Path], label: str):
        from safetensors import safe_open

        self._open = safe_open
        self.label = label
        self._handles: dict[tuple[Path, str], Any] = {}
        self.where: dict[str, Path] = {}
        for file in files:
            for name in self._handle(file, "np").keys():
                if name in self.where:
                    raise ValueError(f"{file}: tensor {name} is also stored in {self.where[name]}")
                self.where[name] = file

    def _handle(self, file: Path, framework: str):
        key = (file, framework)
        if key not in self._handles:
            try:
                self._handles[key] = self._open(str(file), framework=framework)
            except Exception as exc:  # SafetensorError, OSError, ...
                raise ValueError(
                    f"{file}: cannot read safetensors: {type(exc).__name__}: {exc}"
                ) from exc
        return self._handles[key]

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32 numpy, checked against the expected HF `shape`."""
        file = self.where.get(name)
        if file is None:
            raise ValueError(f"{self.label}: missing tensor {name}")
        handle = self._handle(file, "np")
        try:
            info = handle.get_slice(name)
            got_shape, dtype = tuple(info.get_shape()), info.get_dtype()
        except Exception as exc:
            raise ValueError(f"{file}: cannot read tensor {name}: {exc}") from exc
        if got_shape != shape:
            raise ValueError(f"{file}: tensor {name} has shape {got_shape}, config expects {shape}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {dtype}, expected a float type")
        if dtype == "BF16":  # numpy has no bfloat16: read it through JAX (ml_dtypes)
            handle = self._handle(file, "flax")
        try:
            value = np.asarray(handle.get_tensor(name), dtype=np.float32)
        except Exception as exc:
            raise ValueError(f"{file}: cannot read tensor {name}: {exc}") from exc
        if not np.isfinite(value).all():
            raise ValueError(f"{file}: tensor {name} has non-finite values")
        return value


def _hf_name(key: tuple[str, ...]) -> tuple[str, bool]:
    """Our param path -> (HF tensor name, transpose?). Kernels are [in, out], HF is [out, in]."""
    *modules, leaf = key
    transpose = leaf == "kernel"
    suffix = "bias" if leaf == "bias" else "weight"
    if modules == ["lm_head"]:
        return f"lm_head.{suffix}", transpose
    if not modules:  # embed_tokens
        return f"model.{leaf}.weight", False
    head, *rest = modules
    if head.startswith("layers_"):
        head = f"layers.{head.removeprefix('layers_')}"
    return ".".join(["model", head, *rest, suffix]), transpose


def _load_params(cfg: ModelConfig, arch: str, source: _TensorSource) -> dict:
    from adaserve_jax.model.llama import init_params

    expected = jax.eval_shape(lambda: init_params(cfg))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    values: dict[str, np.ndarray] = {}  # HF name -> our layout, in tree (leaf) order
    for path, spec in leaves:
        name, transpose = _hf_name(tuple(p.key for p in path))
        shape = tuple(spec.shape)
        value = source.get(name, shape[::-1] if transpose else shape)
        values[name] = np.ascontiguousarray(value.T) if transpose else value
    used = set(values)

    if cfg.tie_embeddings and "lm_head.weight" in source.where:
        # Some exporters store the tied head anyway; accept it only when it is the embedding.
        embed = values["model.embed_tokens.weight"]
        head = source.get("lm_head.weight", embed.shape)
        if not np.array_equal(head, embed):
            raise ValueError(
                f"{source.where['lm_head.weight']}: tensor lm_head.weight differs from "
                f"model.embed_tokens.weight but config.json has tie_word_embeddings=true"
            )
        used.add("lm_head.weight")
    if arch == "LlamaForCausalLM" and cfg.qkv_bias:
        # HF Llama's attention_bias also adds an o_proj bias, which our decoder lacks.
        for i in range(cfg.num_layers):
            name = f"model.layers.{i}.self_attn.o_proj.bias"
            if name in source.where:
                bias = source.get(name, (cfg.hidden_size,))
                if np.any(bias != 0):
                    raise ValueError(
                        f"{source.where[name]}: tensor {name} is non-zero; o_proj bias "
                        "(Llama attention_bias) is not supported"
                    )
                used.add(name)

    unexpected = sorted(
        n for n in source.where if n not in used and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        name = unexpected[0]
        raise ValueError(
            f"{source.where[name]}: unexpected tensor {name} ({len(unexpected)} unexpected "
            "in total); does config.json match the weights?"
        )
    return jax.tree_util.tree_unflatten(treedef, list(values.values()))
