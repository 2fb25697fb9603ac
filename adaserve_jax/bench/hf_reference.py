"""Build a `transformers` LlamaForCausalLM holding our weights (benchmarks and tests only)."""

from __future__ import annotations

import numpy as np

from adaserve_jax.model.config import ModelConfig


def to_hf_llama(params: dict, cfg: ModelConfig):
    """A torch float32 LlamaForCausalLM (eval mode) with the same weights as `params`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.qkv_bias:
        raise ValueError("to_hf_llama supports qkv_bias=False models only")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(hf_cfg).eval()

    def t(x, transpose=False):
        a = np.asarray(x, np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.T if transpose else a))

    sd = {
        "model.embed_tokens.weight": t(params["embed_tokens"]),
        "model.norm.weight": t(params["norm"]["weight"]),
    }
    for i in range(cfg.num_layers):
        p = params[f"layers_{i}"]
        pre = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{name}.weight"] = t(p["self_attn"][name]["kernel"], True)
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[pre + f"mlp.{name}.weight"] = t(p["mlp"][name]["kernel"], True)
        sd[pre + "input_layernorm.weight"] = t(p["input_layernorm"]["weight"])
        sd[pre + "post_attention_layernorm.weight"] = t(p["post_attention_layernorm"]["weight"])
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = t(params["lm_head"]["kernel"], True)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    return model
