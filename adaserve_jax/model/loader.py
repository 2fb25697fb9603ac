"""`load_model(path) -> Model`: this project's orbax directories and Hugging Face directories."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adaserve_jax.model.checkpoint import is_model_dir, load_model_dir
from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import forward_causal
from adaserve_jax.model.tokenizer import Tokenizer


@dataclasses.dataclass(eq=False)
class Model:
    """Config + params (+ tokenizer) of one decoder."""

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer | None = None
    path: Path | None = None

    def logits(self, token_ids) -> np.ndarray:
        """Full causal forward (for checking): i32[T] -> f32[T, V]."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        if ids.size > self.config.max_seq_len:
            raise ValueError(f"{ids.size} tokens exceed max_seq_len={self.config.max_seq_len}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return np.asarray(_causal_logits(self.params, self.config, jnp.asarray(ids)[None])[0])


@partial(jax.jit, static_argnums=(1,))
def _causal_logits(params, cfg, tokens):
    return forward_causal(params, cfg, tokens)


def _find_tokenizer(path: Path) -> Tokenizer | None:
    for candidate in (path / "tokenizer.json", path.parent / "tokenizer.json"):
        if candidate.is_file():
            return Tokenizer(candidate)
    return None


def load_model(path: str | Path) -> Model:
    """Load an orbax model directory written by this project or a Hugging Face directory.

    Raises ValueError naming the file and the problem for missing/corrupt directories,
    unknown architectures and mismatched tensor shapes.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: model directory does not exist")
    if is_model_dir(path):
        cfg, params = load_model_dir(path)
    elif (path / "config.json").is_file():
        from adaserve_jax.model.hf_import import load_hf_dir

        cfg, params = load_hf_dir(path)
    else:
        raise ValueError(
            f"{path}: neither an adaserve model directory (model_config.json) "
            "nor a Hugging Face directory (config.json)"
        )
    tokenizer = _find_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return Model(cfg, params, tokenizer, path)
