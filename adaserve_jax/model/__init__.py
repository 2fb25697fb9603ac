"""Model definition, checkpoints and tokenizers."""

from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import Transformer, forward_causal, init_params

__all__ = ["ModelConfig", "Transformer", "forward_causal", "init_params"]
