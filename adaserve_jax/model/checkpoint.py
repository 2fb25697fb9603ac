"""Orbax checkpoints written by this project.

A model directory holds:
    model_config.json   ModelConfig fields
    params/             orbax StandardCheckpointer tree of the flax `params` collection
    tokenizer.json      (optional; otherwise the parent directory's tokenizer.json is used)

`save_model_dir` writes to a temporary sibling and renames it into place, so a
partially written directory is never mistaken for a complete one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from adaserve_jax.model.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save_model_dir(path: str | Path, params: dict, cfg: ModelConfig) -> Path:
    """Atomically write `params` + `cfg` as a model directory at `path` (replacing it)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg.save_json(tmp / CONFIG_FILE)
        host_params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, host_params)
            ckptr.wait_until_finished()
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model_dir(path: str | Path) -> tuple[ModelConfig, dict]:
    """Read a directory written by `save_model_dir`; ValueError naming the file on any problem."""
    import orbax.checkpoint as ocp

    from adaserve_jax.model.llama import init_params

    path = Path(path).absolute()
    cfg = ModelConfig.load_json(path / CONFIG_FILE)
    params_path = path / PARAMS_DIR
    if not params_path.is_dir():
        raise ValueError(f"{params_path}: missing orbax params directory")
    expected = jax.eval_shape(lambda: init_params(cfg))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), expected)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_path, target)
    except Exception as exc:  # orbax raises many types for corrupt or mismatched trees
        raise ValueError(
            f"{params_path}: cannot restore params for {CONFIG_FILE} shapes: "
            f"{type(exc).__name__}: {str(exc)[:400]}"
        ) from exc
    _check_shapes(params, expected, params_path)
    return cfg, params


def _check_shapes(params: dict, expected: dict, where: Path) -> None:
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if len(got) != len(want):
        raise ValueError(f"{where}: expected {len(want)} tensors, found {len(got)}")
    for key, value in got:
        if key not in want:
            raise ValueError(f"{where}: unexpected tensor {jax.tree_util.keystr(key)}")
        if tuple(value.shape) != tuple(want[key].shape):
            raise ValueError(
                f"{where}: tensor {jax.tree_util.keystr(key)} has shape {tuple(value.shape)}, "
                f"config expects {tuple(want[key].shape)}"
            )
