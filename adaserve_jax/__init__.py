"""adaserve-jax: SLO-customized speculative decoding (AdaServe) in JAX."""

from adaserve_jax.api import Engine, GenerationOutput
from adaserve_jax.model import Model, ModelConfig, load_model

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationOutput", "Model", "ModelConfig", "load_model"]
