"""JAX's persistent compilation cache, so restarts and test runs reuse compiled steps."""

from __future__ import annotations

import os
from pathlib import Path

import jax

_enabled = False


def enable_compile_cache(path: str | None = None) -> Path | None:
    """Turn on the on-disk XLA cache (ADASERVE_JAX_CACHE overrides; 'off' disables)."""
    global _enabled
    path = (
        path
        or os.environ.get("ADASERVE_JAX_CACHE")
        or str(Path.home() / ".cache" / "adaserve_jax" / "xla")
    )
    if path == "off":
        return None
    if not _enabled:
        Path(path).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _enabled = True
    return Path(path)
