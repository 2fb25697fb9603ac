"""Scale-out: the device mesh, placing params/caches by the model's rules, multi-host start-up.

Single host: `Engine(target, draft, devices=N)` builds a 1-D mesh of the first N devices over
the tensor-parallel axis `TP` (`make_mesh`) and hands it to each `DeviceModel`, which places
its parameters and KV caches with `NamedSharding`s derived from the rules in
`adaserve_jax/model/sharding.py` (`place_params`, `place_caches`). The jitted steps are the
same functions as on one device: XLA's SPMD partitioner follows the input shardings and adds
the two all-reduces per layer; tree attention runs per shard under `shard_map`
(`shard_attention`), so a Pallas kernel sees only its own heads and never needs partitioning.

Multi-host (one process per host, every process sees the global mesh):
    1. every process calls `initialize_distributed(DistributedConfig.from_args(args))`
       before touching jax (flags `--coordinator-address --num-processes --process-id`, or
       the environment variables `ADASERVE_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID`;
       with none of them and `--distributed auto` JAX auto-detects Cloud TPU / SLURM / MPI);
    2. every process builds the same `Engine(..., devices=N)` (N = global device count);
    3. only `is_primary()` (process 0) serves gRPC; see docs/MESH.md for how the step
       inputs reach the other processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.sharding import (
    HEADS_SPEC,
    KV_CACHE_SPEC,
    TP,
    check_divisible,
    param_specs,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "ADASERVE_"


# ---------------------------------------------------------------------------------- mesh


def make_mesh(devices: int | Sequence[jax.Device] | None) -> Mesh | None:
    """A 1-D tensor-parallel mesh over `devices` (a count: the first N of `jax.devices()`).

    None means no mesh (plain single-device placement). Raises ValueError for a count that
    is not a positive int or exceeds the devices JAX sees.
    """
    if devices is None:
        return None
    if isinstance(devices, int) and not isinstance(devices, bool):
        available = jax.devices()
        if devices <= 0:
            raise ValueError(f"devices={devices} must be a positive int")
        if devices > len(available):
            raise ValueError(
                f"devices={devices} but only {len(available)} {jax.default_backend()} "
                f"device(s) are visible (on CPU, set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} before importing jax)"
            )
        if jax.process_count() > 1 and devices != len(available):
            raise ValueError(
                f"devices={devices}: a {jax.process_count()}-process job must use all "
                f"{len(available)} global devices (every process needs its share)"
            )
        chosen = available[:devices]
    elif isinstance(devices, Sequence) and devices and not isinstance(devices, str):
        chosen = list(devices)
    else:
        raise ValueError(f"devices={devices!r} must be a positive int or a list of devices")
    return Mesh(np.asarray(chosen, dtype=object), (TP,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[TP])


def validate_model(cfg: ModelConfig, mesh: Mesh | None, role: str = "model") -> None:
    """ValueError naming the model if its heads / KV heads / MLP do not split over the mesh."""
    if mesh is None:
        return
    try:
        check_divisible(cfg, mesh_size(mesh))
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """Pytree of NamedShardings for `params` (rules: adaserve_jax/model/sharding.py)."""
    specs = param_specs(params, cfg, mesh_size(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV caches f32[S, L, KVH, Dh] are split over KV heads."""
    return NamedSharding(mesh, KV_CACHE_SPEC)


def place_params(params: Any, cfg: ModelConfig, mesh: Mesh | None) -> Any:
    """Put params on device: sharded by the rules on a mesh, else `jax.device_put`."""
    if mesh is None:
        return jax.device_put(params)
    shardings = param_shardings(params, cfg, mesh)
    return jax.tree.map(_put, params, shardings)


def place_caches(
    init: Callable, cfg: ModelConfig, num_slots: int, max_len: int, mesh: Mesh | None
) -> Any:
    """`init(cfg, num_slots, max_len)` KV caches, built directly in their shards on a mesh
    (split over KV heads), so no device ever holds a whole cache."""
    if mesh is None:
        return init(cfg, num_slots, max_len)
    sharding = cache_sharding(mesh)
    build = jax.jit(lambda: init(cfg, num_slots, max_len), out_shardings=sharding)
    return build()


def place_batch(arrays: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, Any]:
    """Replicate a step's host inputs over the mesh (every process passes the same values)."""
    if mesh is None or jax.process_count() == 1:
        return arrays  # numpy: jit replicates it over the computation's devices
    sharding = replicated(mesh)
    return {k: _put(np.asarray(v), sharding) for k, v in arrays.items()}


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-host: each process holds the full host value and contributes its local shards.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def shard_attention(attention: Callable, mesh: Mesh | None) -> Callable:
    """Run a tree-attention implementation once per shard of heads (`shard_map`).

    Each device gets its `H/n` query heads, `KVH/n` KV heads and cache shard, and the full
    (replicated) slot / ctx_len / tree_mask; no communication. Same signature as
    `tree_attention_reference` (the `attention_impl` contract).
    """
    if mesh is None:
        return attention
    rep = P()
    in_specs = (HEADS_SPEC, KV_CACHE_SPEC, KV_CACHE_SPEC, HEADS_SPEC, HEADS_SPEC, rep, rep, rep)

    def sharded(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask, *, attended_len):
        def per_shard(*args):
            return attention(*args, attended_len=attended_len)

        return jax.shard_map(
            per_shard, mesh=mesh, in_specs=in_specs, out_specs=HEADS_SPEC, check_vma=False
        )(q, k_cache, v_cache, k_new, v_new, slot, ctx_len, tree_mask)

    return sharded


# ------------------------------------------------------------------- multi-host serving

HEADER = 6  # i32: (key, up to five call-specific ints); key STOP ends `follow`
STOP = -1
_TARGET_STEP, _DRAFT_STEP, _DRAFT_EXPAND = 0, 1, 2


class StepMirror:
    """Process 0 publishes every device call; the other processes replay it.

    JAX is multi-controller: each process must launch the same jitted computations, in the
    same order, with the same (replicated) host inputs. Only process 0 runs gRPC and the
    scheduler, so before each device call it broadcasts a header i32[HEADER] (which call and
    its static arguments) and then the call's numpy inputs (`broadcast_one_to_all`); the other
    processes sit in `follow()` and make the identical call. Followers never run a scheduler,
    a warm-up or a profile of their own: those reach them as the primary's calls.
    """

    def __init__(self) -> None:
        self.primary = is_primary()
        self._replay: dict[int, tuple[Callable, Callable]] = {}

    def register(self, key: int, template: Callable, run: Callable) -> Callable:
        """`template(ints) -> dict of zero arrays` shaped like the call's inputs; `run(ints,
        arrays)` makes the call. Returns the publisher to invoke before each call."""
        self._replay[key] = (template, run)
        return lambda ints, arrays: self.publish(key, ints, arrays)

    def publish(self, key: int, ints: Sequence[int], arrays: dict[str, np.ndarray]) -> None:
        if not self.primary:
            return
        from jax.experimental import multihost_utils

        header = np.zeros(HEADER, np.int32)
        header[0] = key
        header[1 : 1 + len(ints)] = ints
        multihost_utils.broadcast_one_to_all(header)
        multihost_utils.broadcast_one_to_all({k: np.asarray(v) for k, v in arrays.items()})

    def follow(self) -> int:
        """Replay the primary's calls until it calls `stop`; returns how many were replayed."""
        from jax.experimental import multihost_utils

        if self.primary:
            raise RuntimeError("process 0 drives the engine; only other processes follow")
        count = 0
        while True:
            header = multihost_utils.broadcast_one_to_all(np.zeros(HEADER, np.int32))
            key, ints = int(header[0]), tuple(int(x) for x in header[1:])
            if key == STOP:
                return count
            template, run = self._replay[key]
            run(ints, multihost_utils.broadcast_one_to_all(template(ints)))
            count += 1

    def stop(self) -> None:
        """Primary: release the followers from `follow()` (at shutdown)."""
        if self.primary:
            from jax.experimental import multihost_utils

            header = np.zeros(HEADER, np.int32)
            header[0] = STOP
            multihost_utils.broadcast_one_to_all(header)


def attach_mirror(target: Any, draft: Any | None) -> StepMirror | None:
    """In a multi-process job, route the DeviceModel / DraftDevice calls through a mirror."""
    if jax.process_count() == 1:
        return None
    from adaserve_jax.engine.batch import FlatBatch
    from adaserve_jax.engine.tree import TreeShape
    from adaserve_jax.steps.flat_step import HEADS

    mirror = StepMirror()

    def attach_flat(key: int, dev: Any) -> None:
        def template(ints):
            return FlatBatch.build([], (ints[1],), (ints[2],), max_moves=dev.max_moves).arrays

        def run(ints, arrays):
            call = argparse.Namespace(arrays=arrays, attended_len=ints[2])
            dev._call(call, HEADS[ints[0]])

        publish = mirror.register(key, template, run)
        dev.mirror = lambda head, batch: publish(
            (HEADS.index(head), len(batch.arrays["tokens"]), batch.attended_len), batch.arrays
        )

    attach_flat(_TARGET_STEP, target)
    if draft is not None:
        attach_flat(_DRAFT_STEP, draft.device)

        def template(ints):  # ints: depth, width, topk, ctx, rows
            k, r = ints[2], ints[4]
            return {
                "vals": np.zeros((r, k), np.float32),
                "toks": np.zeros((r, k), np.int32),
                "slots": np.zeros(r, np.int32),
                "root_pos": np.zeros(r, np.int32),
            }

        def run(ints, a):
            shape = TreeShape(*ints[:3])
            draft._call_expand(a["vals"], a["toks"], a["slots"], a["root_pos"], shape, ints[3])

        publish = mirror.register(_DRAFT_EXPAND, template, run)
        draft.mirror = lambda vals, toks, slots, root_pos, shape, ctx: publish(
            (shape.depth, shape.width, shape.topk, ctx, len(slots)),
            {
                "vals": np.asarray(vals, np.float32),
                "toks": np.asarray(toks, np.int32),
                "slots": np.asarray(slots, np.int32),
                "root_pos": np.asarray(root_pos, np.int32),
            },
        )
    return mirror


# ---------------------------------------------------------------------------- multi-host


@dataclasses.dataclass(frozen=True, slots=True)
class DistributedConfig:
    """How this process joins a multi-host job (`jax.distributed.initialize`).

    `mode`: "off" (single process, the default), "on" (explicit coordinator / count / id),
    "auto" (let JAX detect Cloud TPU, SLURM, Open MPI, ... clusters). `coordinator_address`
    is "host:port" of process 0, reachable from every host.
    """

    mode: str = "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("off", "on", "auto"):
            raise ValueError(f"mode={self.mode!r} must be 'off', 'on' or 'auto'")
        if self.mode != "on":
            return
        addr = self.coordinator_address
        if not addr or ":" not in addr or not addr.rsplit(":", 1)[1].isdigit():
            raise ValueError(f"coordinator_address={addr!r} must be 'host:port'")
        n, i = self.num_processes, self.process_id
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_processes={n!r} must be a positive int")
        if not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"process_id={i!r} must be in [0, num_processes={n})")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistributedConfig:
        """From ADASERVE_DISTRIBUTED / _COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID."""
        return cls._build(*cls._env_values(env))

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, env: dict[str, str] | None = None
    ) -> DistributedConfig:
        """Flags from `add_arguments` win over the environment."""
        mode, address, num, pid = cls._env_values(env)
        return cls._build(
            args.distributed if args.distributed is not None else mode,
            args.coordinator_address or address,
            args.num_processes if args.num_processes is not None else num,
            args.process_id if args.process_id is not None else pid,
        )

    @staticmethod
    def _env_values(env: dict[str, str] | None) -> tuple[str | None, ...]:
        env = os.environ if env is None else env
        names = ("DISTRIBUTED", "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID")
        return tuple(env.get(ENV_PREFIX + n) or None for n in names)

    @classmethod
    def _build(cls, mode, address, num, pid) -> DistributedConfig:
        def as_int(name, value):
            if value is None or isinstance(value, int):
                return value
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} must be an int") from None

        num, pid = as_int("num_processes", num), as_int("process_id", pid)
        if mode is None:  # implied by the other settings
            mode = "on" if (address or num is not None or pid is not None) else "off"
        return cls(mode, address or None, num, pid)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("multi-host (jax.distributed)")
        g.add_argument(
            "--distributed",
            choices=("off", "on", "auto"),
            default=None,
            help="join a multi-host job (default: on if any of the flags below is given; "
            "env ADASERVE_DISTRIBUTED)",
        )
        g.add_argument(
            "--coordinator-address",
            default=None,
            help="host:port of process 0 (env ADASERVE_COORDINATOR_ADDRESS)",
        )
        g.add_argument(
            "--num-processes",
            type=int,
            default=None,
            help="processes (hosts) in the job (env ADASERVE_NUM_PROCESSES)",
        )
        g.add_argument(
            "--process-id",
            type=int,
            default=None,
            help="this process's rank, 0 serves gRPC (env ADASERVE_PROCESS_ID)",
        )


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Call `jax.distributed.initialize` per `cfg`; returns whether it did. Call first thing."""
    if cfg.mode == "off":
        return False
    if cfg.mode == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_primary() -> bool:
    """Process 0: the one that serves gRPC and drives the scheduler."""
    return jax.process_index() == 0
