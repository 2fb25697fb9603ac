"""load_model + Engine.generate on Hugging Face checkpoints vs transformers' generate."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from adaserve_jax import Engine, load_model  # noqa: E402

CFG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_engine_greedy_equals_transformers_generate(arch, tmp_path):
    torch.manual_seed(0)
    config_cls = transformers.LlamaConfig if arch.startswith("Llama") else transformers.Qwen2Config
    hf = getattr(transformers, arch)(config_cls(**CFG)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    engine = Engine(
        model, max_batch=2, token_buckets=(1, 4, 16, 64), ctx_buckets=(64, 128), progress=False
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (20, 45, 7)]
    outs = engine.generate(prompts, max_tokens=32)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=32,
                pad_token_id=0,
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()
