"""Measure the shipped draft/target pair on held-out text and write `checkpoints/eval.json`.

Every number here is measured on the manifest's held-out split (never seen in training):
    * held-out loss (nats/token) and perplexity of both models, code and prose separately;
    * teacher-forced greedy agreement: the fraction of held-out code positions where
      argmax(draft) == argmax(target) given the same true prefix;
    * accepted tokens per step of a depth-4 chain under greedy verification: from many held-out
      prefixes the draft greedily proposes 4 tokens, the target scores prefix + proposal in one
      pass, the longest prefix of the proposal equal to the target's argmax is accepted, and the
      target's next token is the bonus (so every step yields 1..5 tokens);
    * three target samples continuing held-out Python function headers.

CLI: python -m adaserve_jax.train --evaluate   (flags: see `evaluate_cli`)
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaserve_jax.corpus import EOT, Manifest, load_documents, tokenize_documents, tokenize_split
from adaserve_jax.model.checkpoint import load_model_dir
from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import forward_causal
from adaserve_jax.train import PRESETS, RUN_CONFIG, eval_windows

CHAIN_DEPTH = 4
CONTEXT_LINES = 12
SAMPLE_TEMPERATURE = 0.5
SAMPLE_TOKENS = 96


@partial(jax.jit, static_argnums=(1,))
def _nll_and_argmax(params, cfg: ModelConfig, batch):
    """batch i32[B, T+1] -> (NLL f32[B, T], argmax i32[B, T])."""
    logits = forward_causal(params, cfg, batch[:, :-1])  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(1,))
def _argmax(params, cfg: ModelConfig, tokens):
    """tokens i32[B, T] -> argmax i32[B, T]."""
    return jnp.argmax(forward_causal(params, cfg, tokens), axis=-1).astype(jnp.int32)


def loss_and_agreement(target, draft, windows: np.ndarray, batch: int = 4) -> dict[str, float]:
    """Both models' held-out loss and their teacher-forced top-1 agreement on `windows`."""
    (t_cfg, t_params), (d_cfg, d_params) = target, draft
    t_nll, d_nll, agree, count = 0.0, 0.0, 0, 0
    for i in range(0, len(windows), batch):
        chunk = jnp.asarray(windows[i : i + batch])
        tn, ta = _nll_and_argmax(t_params, t_cfg, chunk)
        dn, da = _nll_and_argmax(d_params, d_cfg, chunk)
        t_nll += float(jnp.sum(tn))
        d_nll += float(jnp.sum(dn))
        agree += int(jnp.sum(ta == da))
        count += tn.size
    t_loss, d_loss = t_nll / count, d_nll / count
    return {
        "tokens": count,
        "target_loss": t_loss,
        "target_ppl": float(np.exp(t_loss)),
        "draft_loss": d_loss,
        "draft_ppl": float(np.exp(d_loss)),
        "top1_agreement": agree / count,
    }


def chain_acceptance(
    target,
    draft,
    stream: np.ndarray,
    num_prefixes: int = 256,
    prefix_len: int = 256,
    depth: int = CHAIN_DEPTH,
    batch: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean tokens per greedy verify step (accepted draft tokens + 1 bonus) of a depth chain."""
    (t_cfg, t_params), (d_cfg, d_params) = target, draft
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - prefix_len, size=num_prefixes)
    prefixes = np.stack([stream[s : s + prefix_len] for s in starts]).astype(np.int32)
    per_step = []
    for i in range(0, num_prefixes, batch):
        buf = np.concatenate(  # [b, L + depth], the proposal is written into the tail
            [prefixes[i : i + batch], np.zeros((len(prefixes[i : i + batch]), depth), np.int32)],
            axis=1,
        )
        for k in range(depth):  # causal: padding after position L + k - 1 cannot leak back
            nxt = np.asarray(_argmax(d_params, d_cfg, jnp.asarray(buf)))[:, prefix_len + k - 1]
            buf[:, prefix_len + k] = nxt
        verify = np.asarray(_argmax(t_params, t_cfg, jnp.asarray(buf)))
        want = verify[:, prefix_len - 1 : prefix_len - 1 + depth]  # target's choice per slot
        match = want == buf[:, prefix_len:]
        accepted = np.cumprod(match, axis=1).sum(axis=1)  # longest matching prefix
        per_step.extend((accepted + 1).tolist())
    per_step = np.asarray(per_step)
    return {
        "depth": depth,
        "prefixes": int(num_prefixes),
        "prefix_len": prefix_len,
        "mean_tokens_per_step": float(per_step.mean()),
        "histogram_1_to_5": [int((per_step == j).sum()) for j in range(1, depth + 2)],
    }


def function_headers(
    manifest: Manifest, count: int = 3, context_lines: int = CONTEXT_LINES
) -> list[tuple[str, str]]:
    """(file context, def-line) from `count` distinct held-out code files, in manifest order.

    The context is the `context_lines` lines before the header in its file (imports, the
    enclosing class), so the model continues the header where it really occurs.
    """
    pattern = re.compile(r"^\s*def \w+\(.*\).*:\s*$")
    headers = []
    for text in load_documents(manifest.select("heldout", "code")):
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if pattern.match(line) and len(line) < 90 and i >= context_lines:
                headers.append(("".join(lines[i - context_lines : i]), line))
                break
        if len(headers) == count:
            break
    return headers


@partial(jax.jit, static_argnums=(1,))
def _next_logits(params, cfg: ModelConfig, buf, pos):
    """buf i32[1, T], pos i32 -> logits f32[V] predicting position pos + 1."""
    return forward_causal(params, cfg, buf)[0, pos]


def sample(
    model, tokenizer, prompt: str, max_new: int, temperature: float, seed: int, min_new: int = 0
) -> str:
    """Temperature sampling without a KV cache (fixed-size buffer, one compile).

    `<|endoftext|>` is masked for the first `min_new` tokens (so a sample is never empty).
    """
    cfg, params = model
    eot = tokenizer.token_to_id(EOT)
    ids = [eot] + tokenizer.encode(prompt, add_special_tokens=False).ids
    size = len(ids) + max_new
    buf = np.zeros((1, size), np.int32)
    buf[0, : len(ids)] = ids
    key = jax.random.PRNGKey(seed)
    n = len(ids)
    while n < size:
        logits = _next_logits(params, cfg, jnp.asarray(buf), n - 1)
        if n - len(ids) < min_new:
            logits = logits.at[eot].set(-jnp.inf)
        key, sub = jax.random.split(key)
        tok = int(jax.random.categorical(sub, logits / temperature))
        if tok == eot:
            break
        buf[0, n] = tok
        n += 1
    return tokenizer.decode(buf[0, len(ids) : n].tolist())


def _training_summary(run_dir: Path, tokens_per_step: int) -> dict[str, Any] | None:
    """Steps, tokens, wall time (run start = pinned config file, end = last log write)."""
    log, start = run_dir / "log.jsonl", run_dir / RUN_CONFIG
    if not log.is_file() or not start.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "heldout_loss" in r]
    steps = max(r["step"] for r in records)
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_seconds": round(log.stat().st_mtime - start.stat().st_mtime),
        "final_train_loss": records[-1].get("loss"),
        "heldout_code_loss_curve": [(r["step"], round(r["heldout_loss"], 4)) for r in evals],
    }


def evaluate(
    target_dir: str | Path,
    draft_dir: str | Path,
    manifest_path: str | Path,
    tokenizer_path: str | Path,
    cache_dir: str | Path,
    num_prefixes: int = 256,
    max_windows: int = 64,
) -> dict[str, Any]:
    from tokenizers import Tokenizer

    t0 = time.time()
    target, draft = load_model_dir(target_dir), load_model_dir(draft_dir)
    pair = ((target[0], target[1]), (draft[0], draft[1]))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    manifest = Manifest.load(manifest_path)
    result: dict[str, Any] = {
        "target_params": target[0].num_params(),
        "draft_params": draft[0].num_params(),
    }
    for kind in ("code", "prose"):
        stream = tokenize_split(manifest_path, tokenizer_path, "heldout", kind, cache_dir)
        windows = eval_windows(stream, target[0].max_seq_len, max_windows)
        result[f"heldout_{kind}"] = loss_and_agreement(*pair, windows)
    code = tokenize_split(manifest_path, tokenizer_path, "heldout", "code", cache_dir)
    result["chain_depth4_greedy"] = chain_acceptance(*pair, code, num_prefixes=num_prefixes)
    # The generated codec tables (encodings/*) are very repetitive: also report without them.
    files = [f for f in manifest.select("heldout", "code") if "/encodings/" not in f.path]
    plain = tokenize_documents(tokenizer, load_documents(files))
    result["heldout_code_without_encodings"] = {
        "files": [Path(f.path).name for f in files],
        **loss_and_agreement(*pair, eval_windows(plain, target[0].max_seq_len, max_windows)),
        "chain_depth4_greedy": chain_acceptance(*pair, plain, num_prefixes=num_prefixes),
    }
    result["samples"] = [
        {
            "context": ctx,
            "header": header,
            "completion": sample(
                target, tokenizer, ctx + header, SAMPLE_TOKENS, SAMPLE_TEMPERATURE, i, 16
            ),
        }
        for i, (ctx, header) in enumerate(function_headers(manifest))
    ]
    result["sampling"] = {
        "temperature": SAMPLE_TEMPERATURE,
        "max_new_tokens": SAMPLE_TOKENS,
        "min_new_tokens": 16,
        "context_lines_before_header": CONTEXT_LINES,
        "seeds": [0, 1, 2],
    }
    for name, (_, tc) in PRESETS.items():
        summary = _training_summary(Path(tc.run_dir), tc.tokens_per_step)
        if summary is not None:
            result[f"training_{name}"] = summary
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def evaluate_cli(args) -> None:
    """Entry point of `python -m adaserve_jax.train --evaluate`."""
    out = Path(getattr(args, "eval_out", None) or "checkpoints/eval.json")
    result = evaluate(
        getattr(args, "target_dir", None) or "checkpoints/target",
        getattr(args, "draft_dir", None) or "checkpoints/draft",
        args.manifest,
        args.tokenizer,
        args.cache_dir,
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("heldout_code", "chain_depth4_greedy", "heldout_code_without_encodings")
    summary = {k: result[k] for k in keys}
    print(json.dumps(summary, indent=2))
    for s in result["samples"]:
        print("-" * 60 + "\n" + s["header"] + s["completion"])
