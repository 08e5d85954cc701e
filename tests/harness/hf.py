"""Tiny random Hugging Face models for the import/export tests, built locally from transformers'
own config classes (nothing downloaded): several layers, grouped-query attention, E = 4 experts,
top-2, and each architecture's own settings (QK-norm, shared expert and its gate, q/k/v biases,
norm_topk_prob, dense layers between MoE layers, an explicit head_dim, tied or untied
embeddings). Weights are redrawn with a spread large enough that routing and logits are far from
uniform, so a scrambled expert, head or half-rotation cannot hide under the tolerance."""

from __future__ import annotations

import torch

VOCAB = 300  # >= 257: the byte tokenizer's synthetic corpus trains it in the EP tests
SEQ = 16

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, num_experts_per_tok=2)

# name -> (transformers config class, its kwargs, CausalLM class)
MODELS = {
    "mixtral": ("MixtralConfig", dict(COMMON, num_hidden_layers=3, intermediate_size=24, num_local_experts=4,
                                      tie_word_embeddings=False, rope_theta=10000.0), "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, decoder_sparse_step=2,
                                         norm_topk_prob=False, qkv_bias=True, tie_word_embeddings=True),
                  "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16,
                                         num_experts=4, head_dim=16, norm_topk_prob=True, mlp_only_layers=[0],
                                         tie_word_embeddings=False), "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", dict(COMMON, num_hidden_layers=3, intermediate_size=16, num_experts=4,
                                  norm_topk_prob=False, tie_word_embeddings=False, pad_token_id=1,
                                  eos_token_id=2), "OlmoeForCausalLM"),
    "llama": ("LlamaConfig", dict(COMMON, num_hidden_layers=2, intermediate_size=40, tie_word_embeddings=False),
              "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", dict(COMMON, num_hidden_layers=2, intermediate_size=40, tie_word_embeddings=True),
              "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(COMMON, num_hidden_layers=2, intermediate_size=40, head_dim=16,
                                  tie_word_embeddings=False), "Qwen3ForCausalLM"),
}
MOE_MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_config(name: str, models: dict | None = None, **overrides):
    """The config of architecture `name` in `models` (default: this module's MODELS)."""
    import transformers

    cls_name, kwargs, _ = (models or MODELS)[name]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def build_hf(name: str, seed: int = 0, models: dict | None = None, **overrides):
    """A random model of architecture `name` in `models` (default: MODELS), in eval mode (fp32)."""
    import transformers

    config = hf_config(name, models, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, (models or MODELS)[name][2])(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def save_hf(model, path: str, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return path


def tokens(batch: int = 3, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))


def hf_logits(model, toks: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if toks is None else toks).logits
