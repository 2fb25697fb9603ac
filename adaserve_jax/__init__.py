"""adaserve-jax: SLO-customized speculative decoding (AdaServe) in JAX.

Public names are imported lazily so that numpy-only layers (the scheduler, the
server) can be imported without loading jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationOutput", "Model", "ModelConfig", "load_model"]

_LAZY = {
    "Engine": "adaserve_jax.api",
    "GenerationOutput": "adaserve_jax.api",
    "Model": "adaserve_jax.model.loader",
    "ModelConfig": "adaserve_jax.model.config",
    "load_model": "adaserve_jax.model.loader",
}

if TYPE_CHECKING:
    from adaserve_jax.api import Engine, GenerationOutput
    from adaserve_jax.model.config import ModelConfig
    from adaserve_jax.model.loader import Model, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adaserve_jax' has no attribute {name!r}")
