"""Train the shipped target model and distil the draft from it (optax + orbax, CPU-friendly).

Run lifecycle (`train`):
    1. Load the token streams of the manifest's train split (code and prose, sampled with
       `code_fraction`) and the held-out code stream for periodic evaluation.
    2. Open an orbax CheckpointManager under `<run_dir>/ckpt`. Orbax writes every step into a
       `*.orbax-checkpoint-tmp-*` directory and renames it when complete, so a checkpoint cut
       off mid-write is never listed as the latest step. `<run_dir>/model_config.json` pins the
       model shape; resuming a run with another shape is a ValueError before any restore.
    3. Resume from the latest complete step (params + AdamW state), or initialise. Batch `s` is
       drawn from `np.random.default_rng([seed, s])`, so a resumed run sees the same batches.
    4. Each step is one jitted update: AdamW with linear warmup + cosine decay, global-norm
       clipping. The learning rate warms up linearly, holds, and then follows a cosine down to
       `min_lr_ratio * lr` over the last `decay_frac` of the steps (decay_frac=1 is the classic
       warmup + cosine). Until the decay starts the batches are `short_seq_len` windows (same
       tokens per step, cheaper attention); the decay phase trains at `seq_len` (1024), so the
       model finishes at full context. Because nothing before the decay start depends on
       `steps`, a run may be resumed with a different `--steps` as long as it has not reached
       the decay yet, and it is then identical to a fresh run with that step count.
       The draft preset adds the teacher's logits:
       loss = alpha * KL(teacher || draft) + (1 - alpha) * next-token CE.
    5. Every `eval_every` steps: held-out loss; every `ckpt_every` steps: a checkpoint. At the
       end the params are exported with `save_model_dir` (float32) to `export_dir`.

CLI (the shipped pair is these four presets in this order, then the evaluation):
    python -m adaserve_jax.train --preset target          # -> checkpoints/target
    python -m adaserve_jax.train --preset draft           # distils from checkpoints/target
    python -m adaserve_jax.train --preset target-cont     # continues checkpoints/target
    python -m adaserve_jax.train --preset draft-cont      # continues the draft, new teacher
    python -m adaserve_jax.train --evaluate               # -> checkpoints/eval.json
    --init-from DIR --run-dir R --out O: continued training of any preset (new schedule)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaserve_jax.corpus import EOT, tokenize_split
from adaserve_jax.model.checkpoint import load_model_dir, save_model_dir
from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import forward_causal, init_params

CKPT_SUBDIR = "ckpt"
RUN_CONFIG = "model_config.json"


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters and paths of one training run (all defaults reproduce the target)."""

    steps: int = 640
    batch_size: int = 4
    seq_len: int = 1024
    short_seq_len: int = 256
    decay_frac: float = 0.16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.1
    b2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 16
    ckpt_every: int = 20
    seed: int = 0
    code_fraction: float = 0.7
    distill_alpha: float = 0.0
    teacher_dir: str | None = None
    embed_from_teacher: bool = False
    init_from: str | None = None  # warm start: a model dir (exported) of the same shape
    run_dir: str = "runs/target"
    export_dir: str | None = "checkpoints/target"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "short_seq_len", "eval_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0 < self.decay_frac <= 1:
            raise ValueError(f"{self.decay_frac=} must be in (0, 1]")
        if self.seq_len % self.short_seq_len:
            raise ValueError(f"{self.seq_len=} must be a multiple of {self.short_seq_len=}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and 0 <= self.warmup_steps):
            raise ValueError(f"bad schedule {self.lr=} {self.min_lr_ratio=} {self.warmup_steps=}")
        if not 0 <= self.code_fraction <= 1:
            raise ValueError(f"{self.code_fraction=} must be in [0, 1]")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"{self.distill_alpha=} must be in [0, 1]")
        if self.distill_alpha > 0 and not self.teacher_dir:
            raise ValueError(f"{self.distill_alpha=} needs teacher_dir")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def decay_start(self) -> int:
        return max(self.steps - max(1, round(self.decay_frac * self.steps)), self.warmup_steps)

    def lr_at(self, step: jax.Array | int) -> jax.Array:
        """Warmup (linear from 0) -> constant -> cosine to lr * min_lr_ratio at `steps`."""
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(self.warmup_steps, 1)
        span = max(self.steps - self.decay_start, 1)
        frac = jnp.clip((step - self.decay_start) / span, 0.0, 1.0)
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        return self.lr * jnp.where(step < self.warmup_steps, warm, cosine)

    def shape_at(self, step: int) -> tuple[int, int]:
        """(rows, seq_len) of the batch at `step`: short windows first, same tokens per step."""
        if step < self.decay_start:
            return self.batch_size * self.seq_len // self.short_seq_len, self.short_seq_len
        return self.batch_size, self.seq_len


_DRAFT = TrainConfig(
    steps=900,
    decay_frac=0.15,
    lr=3e-3,
    warmup_steps=10,
    distill_alpha=0.9,
    embed_from_teacher=True,
    teacher_dir="checkpoints/target",
    run_dir="runs/draft",
    export_dir="checkpoints/draft",
)

PRESETS: dict[str, tuple[Any, TrainConfig]] = {
    "target": (ModelConfig.target_small, TrainConfig()),
    "draft": (ModelConfig.draft_small, _DRAFT),
    # The shipped pair continues both: run target, draft, target-cont, draft-cont in this order.
    # Each warm-starts from its base preset's export (new schedule, new run dir, new seed).
    "target-cont": (
        ModelConfig.target_small,
        dataclasses.replace(
            TrainConfig(), steps=1000, lr=1e-3, warmup_steps=20, seed=1,
            init_from="checkpoints/target", run_dir="runs/target_cont",
        ),
    ),
    "draft-cont": (
        ModelConfig.draft_small,
        dataclasses.replace(
            _DRAFT, steps=600, lr=1e-3, seed=2, embed_from_teacher=False,
            init_from="checkpoints/draft", run_dir="runs/draft_cont",
        ),
    ),
}  # fmt: skip


# ---- data ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenData:
    """Train streams (u16[N] each) sampled with `weights`, plus the held-out eval stream."""

    train: tuple[np.ndarray, ...]
    weights: tuple[float, ...]
    heldout: np.ndarray

    def __post_init__(self) -> None:
        if not self.train or any(len(s) < 2 for s in self.train):
            raise ValueError("training token stream is empty")
        if len(self.heldout) < 2:
            raise ValueError("held-out token stream is empty")


def load_token_data(
    manifest: str | Path, tokenizer: str | Path, code_fraction: float, cache_dir: str | Path
) -> TokenData:
    code = tokenize_split(manifest, tokenizer, "train", "code", cache_dir)
    prose = tokenize_split(manifest, tokenizer, "train", "prose", cache_dir)
    heldout = tokenize_split(manifest, tokenizer, "heldout", "code", cache_dir)
    return TokenData((code, prose), (code_fraction, 1 - code_fraction), heldout)


def sample_batch(data: TokenData, seed: int, step: int, rows: int, seq_len: int) -> np.ndarray:
    """i32[rows, seq_len + 1] random windows; a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    which = rng.choice(len(data.train), size=rows, p=np.asarray(data.weights) / sum(data.weights))
    out = np.empty((rows, seq_len + 1), np.int32)
    for i, k in enumerate(which):
        stream = data.train[k]
        if len(stream) < seq_len + 1:
            raise ValueError(f"train stream of {len(stream)} tokens is shorter than {seq_len + 1}")
        start = rng.integers(0, len(stream) - seq_len)
        out[i] = stream[start : start + seq_len + 1]
    return out


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """i32[W, seq_len + 1] non-overlapping windows from the start of the held-out stream."""
    seq_len = min(seq_len, len(stream) - 1)
    n = min(max_windows, (len(stream) - 1) // seq_len)
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(
        np.int32
    )


# ---- model + optimiser -----------------------------------------------------------------------
def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = tc.lr_at
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )


def _losses(cfg: ModelConfig, params, batch, teacher_cfg, teacher_params, alpha: float):
    """batch i32[B, T+1] -> (total, ce, kl) means over B*T positions."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logp = jax.nn.log_softmax(forward_causal(params, cfg, inputs), axis=-1)  # [B, T, V]
    ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    if teacher_cfg is None:
        return ce, ce, jnp.float32(0.0)
    t_logits = jax.lax.stop_gradient(forward_causal(teacher_params, teacher_cfg, inputs))
    t_logp = jax.nn.log_softmax(t_logits, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1))
    return alpha * kl + (1 - alpha) * ce, ce, kl


def make_train_step(cfg: ModelConfig, opt, teacher_cfg: ModelConfig | None, alpha: float):
    """Jitted (params, opt_state, batch, teacher_params) -> (params, opt_state, metrics)."""

    def step(params, opt_state, batch, teacher_params):
        def loss(p):
            total, ce, kl = _losses(cfg, p, batch, teacher_cfg, teacher_params, alpha)
            return total, (ce, kl)

        (total, (ce, kl)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": total, "ce": ce, "kl": kl, "grad_norm": optax.global_norm(grads)}
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=4)
def _cached_train_step(cfg: ModelConfig, tc: TrainConfig, teacher_cfg: ModelConfig | None):
    """One compiled step per (model, run config): a resumed run in-process reuses it."""
    return make_train_step(cfg, make_optimizer(tc), teacher_cfg, tc.distill_alpha)


@partial(jax.jit, static_argnums=(1,))
def _eval_nll(params, cfg: ModelConfig, batch):
    """batch i32[B, T+1] -> summed NLL f32 and argmax predictions i32[B, T]."""
    logits = forward_causal(params, cfg, batch[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.sum(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def heldout_loss(params, cfg: ModelConfig, windows: np.ndarray, batch_size: int = 4) -> float:
    """Mean next-token NLL (nats) over all positions of `windows` i32[W, T+1]."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        nll, _ = _eval_nll(params, cfg, jnp.asarray(chunk))
        total += float(nll)
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    return total / count


def embed_init_from_teacher(params: dict, teacher_params: dict) -> dict:
    """Start the student's embedding from the teacher's, projected onto its top principal axes.

    E_t f32[V, Dt] is centred, its top-Ds right singular vectors P f32[Dt, Ds] are taken, and
    E_s = E_t @ P f32[V, Ds] (rescaled to the student's init std): token similarities the teacher
    learned carry over to the (tied) embedding, which is most of the draft's parameters.
    """
    e_t = np.asarray(teacher_params["embed_tokens"], np.float64)  # [V, Dt]
    e_s = np.asarray(params["embed_tokens"])  # [V, Ds]
    if e_t.shape[0] != e_s.shape[0] or e_t.shape[1] < e_s.shape[1]:
        raise ValueError(f"cannot project teacher embedding {e_t.shape} to {e_s.shape}")
    _, _, vt = np.linalg.svd(e_t - e_t.mean(axis=0), full_matrices=False)
    proj = e_t @ vt[: e_s.shape[1]].T  # [V, Ds]
    proj *= e_s.std() / max(proj.std(), 1e-12)
    return {**params, "embed_tokens": jnp.asarray(proj, jnp.float32)}


# One compile instead of many eager op compiles (matters for small test models).
_init_params = jax.jit(init_params, static_argnums=(0, 1))


# ---- checkpoints -----------------------------------------------------------------------------
def open_manager(run_dir: Path, tc: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager((run_dir / CKPT_SUBDIR).absolute(), options=options)


def check_run_config(run_dir: Path, cfg: ModelConfig) -> None:
    """Pin the model shape of a run; ValueError when an existing run has another shape."""
    path = run_dir / RUN_CONFIG
    if path.is_file():
        saved = ModelConfig.load_json(path)
        if saved != cfg:
            diff = {
                k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v
            }
            raise ValueError(
                f"{run_dir}: cannot resume, the checkpointed model has another shape "
                f"(saved, requested): {diff}; use a fresh --run-dir"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(path)


def restore_state(mgr, step: int, abstract_state: dict, where: Path) -> dict:
    import orbax.checkpoint as ocp

    try:
        return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as exc:  # orbax raises several types on a mismatched tree
        raise ValueError(
            f"{where}: checkpoint step {step} does not match this model/optimizer: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc


# ---- training loop ---------------------------------------------------------------------------
def train(cfg: ModelConfig, tc: TrainConfig, data: TokenData, *, progress: bool = True) -> dict:
    """Run (or resume) training to `tc.steps`; returns the final params."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    run_dir = Path(tc.run_dir)
    check_run_config(run_dir, cfg)
    teacher_cfg, teacher_params = None, None
    if tc.distill_alpha > 0:
        teacher_cfg, teacher_params = load_model_dir(tc.teacher_dir)
        if teacher_cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"teacher vocab {teacher_cfg.vocab_size} != {cfg.vocab_size}")
    opt = make_optimizer(tc)
    params = _init_params(cfg, tc.seed)
    if teacher_params is not None and tc.embed_from_teacher:
        params = embed_init_from_teacher(params, teacher_params)
    if tc.init_from:  # continued training: the params of a finished run, a fresh optimizer
        warm_cfg, warm_params = load_model_dir(tc.init_from)
        if warm_cfg != cfg:
            raise ValueError(
                f"--init-from {tc.init_from}: its model config differs from the preset's "
                f"({warm_cfg} vs {cfg})"
            )
        params = jax.tree.map(jnp.asarray, warm_params)
    state = {"params": params, "opt_state": opt.init(params)}
    mgr = open_manager(run_dir, tc)
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = restore_state(mgr, latest, abstract, run_dir)
        start = latest
        print(f"resumed {run_dir} at step {start}", file=sys.stderr)
    params, opt_state = state["params"], state["opt_state"]
    step_fn = _cached_train_step(cfg, tc, teacher_cfg)
    windows = eval_windows(data.heldout, tc.seq_len, tc.eval_windows)
    log_path = run_dir / "log.jsonl"
    bar = tqdm(
        total=tc.steps * tc.tokens_per_step,
        initial=start * tc.tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        mininterval=5.0,
        smoothing=0.1,
    )
    t0 = time.time()
    with open(log_path, "a") as log:
        for step in range(start, tc.steps):
            rows, seq = tc.shape_at(step)
            batch = jnp.asarray(sample_batch(data, tc.seed, step, rows, seq))
            params, opt_state, metrics = step_fn(params, opt_state, batch, teacher_params)
            done = step + 1
            record: dict[str, Any] = {"step": done, "seq_len": seq, "time": round(time.time())}
            record.update({k: float(v) for k, v in metrics.items()})  # one host sync per step
            record["elapsed_s"] = round(time.time() - t0, 1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if done % tc.eval_every == 0 or done == tc.steps:
                record["heldout_loss"] = heldout_loss(params, cfg, windows)
                bar.write(f"step {done}: held-out code loss {record['heldout_loss']:.4f}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if done % tc.ckpt_every == 0 or done == tc.steps:
                mgr.save(
                    done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})
                )
            bar.update(tc.tokens_per_step)
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    if tc.export_dir:
        save_model_dir(tc.export_dir, params, cfg)
        print(f"exported {tc.export_dir}", file=sys.stderr)
    return params


def model_config_for(preset: str, tokenizer_path: str | Path) -> ModelConfig:
    from tokenizers import Tokenizer

    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ValueError(f"{tokenizer_path}: tokenizer not found (python -m adaserve_jax.corpus)")
    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id(EOT)
    factory = PRESETS[preset][0]
    return factory(vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="target")
    ap.add_argument("--evaluate", action="store_true", help="write checkpoints/eval.json")
    ap.add_argument("--manifest", default="checkpoints/corpus_manifest.json")
    ap.add_argument("--tokenizer", default="checkpoints/tokenizer.json")
    ap.add_argument("--cache-dir", default="runs/data")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--decay-frac", type=float)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--ckpt-every", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--teacher-dir")
    ap.add_argument("--embed-from-teacher", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument(
        "--init-from", help="start from this model dir's params (continued training; new run dir)"
    )
    ap.add_argument("--run-dir")
    ap.add_argument("--out", dest="export_dir", help="model directory to export to")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.evaluate:
            from adaserve_jax.train_eval import evaluate_cli

            evaluate_cli(args)
            return
        tc = PRESETS[args.preset][1]
        overrides = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None
        }
        tc = dataclasses.replace(tc, **overrides)
        cfg = model_config_for(args.preset, args.tokenizer)
        if tc.seq_len > cfg.max_seq_len:
            raise ValueError(f"{tc.seq_len=} exceeds the model's max_seq_len={cfg.max_seq_len}")
        data = load_token_data(args.manifest, args.tokenizer, tc.code_fraction, args.cache_dir)
        print(
            f"{args.preset}: {cfg.num_params() / 1e6:.2f}M params, {tc.steps} steps x "
            f"{tc.tokens_per_step} tokens = {tc.steps * tc.tokens_per_step / 1e6:.1f}M tokens; "
            f"train streams {[len(s) for s in data.train]}, held-out {len(data.heldout)}",
            file=sys.stderr,
        )
        train(cfg, tc, data, progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
