"""Model configuration: one frozen dataclass for every Llama-family decoder we run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, Qwen2 and our own models).

    `head_dim` defaults to `hidden_size // num_heads`. `qkv_bias=True` is Qwen2's
    attention bias. `max_seq_len` is the longest sequence (prompt + output) the
    KV cache and RoPE are sized for.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be a positive even int (RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta={self.rope_theta} must be finite and > 0")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be finite and > 0")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count, embeddings included (tied embeddings counted once)."""
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    # ---- named factories -------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides: Any) -> ModelConfig:
        """A few-thousand-parameter model for unit tests."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=256,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def target_small(cls, vocab_size: int = 8192, **overrides: Any) -> ModelConfig:
        """The shipped target: ~12.6M parameters, 1024-token context."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=384,
            intermediate_size=1024,
            num_layers=6,
            num_heads=6,
            num_kv_heads=2,
            max_seq_len=1024,
            tie_embeddings=True,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def draft_small(cls, vocab_size: int = 8192, **overrides: Any) -> ModelConfig:
        """The shipped draft: ~1.4M parameters (about 9x smaller than the target)."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=384,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            max_seq_len=1024,
            tie_embeddings=True,
        )
        base.update(overrides)
        return cls(**base)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config fields {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{source}: {exc}") from exc

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read model config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: model config must be a JSON object")
        return cls.from_dict(data, source=str(path))
