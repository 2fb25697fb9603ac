"""Model definition, checkpoints and tokenizers."""

from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import Transformer, forward_causal, init_params
from adaserve_jax.model.loader import Model, load_model

__all__ = ["Model", "ModelConfig", "Transformer", "forward_causal", "init_params", "load_model"]
