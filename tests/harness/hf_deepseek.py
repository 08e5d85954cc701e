"""Tiny random DeepSeek-V2, DeepSeek-V3 and GLM-4.5 models for the import/export tests, built
locally from transformers' own config classes (nothing downloaded), each with a dense first layer
of its own width (intermediate_size 40 vs moe_intermediate_size 16), shared experts, E = 8
experts, top-2, group-limited routing (DeepSeek-V2's group_limited_greedy and V3's noaux_tc over
2 groups of 4, one of them allowed; GLM-4.5 4 groups of 2, two allowed), and each one's own
attention: latent attention with a low-rank query (V3, interleaved rotary rows) or a full-rank
one (V2, complex-pair rotary), GLM-4.5's grouped-query heads with q/k/v biases, per-head q/k norm
and half-rotary heads. V3 and GLM-4.5 have sigmoid routers with a nonzero
`e_score_correction_bias` large enough to change which experts are chosen, and a
routed_scaling_factor; V2 a softmax router. Weights as tests/harness/hf.py draws them."""

from __future__ import annotations

import os

import torch

from tests.harness import hf
from tests.harness.hf import VOCAB

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-5, num_experts_per_tok=2, num_hidden_layers=3, intermediate_size=40,
              moe_intermediate_size=16, n_routed_experts=8, first_k_dense_replace=1, tie_word_embeddings=False)
MLA = dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, num_key_value_heads=4)

# name -> (transformers config class, its kwargs, CausalLM class)
MODELS = {
    "deepseek_v2": ("DeepseekV2Config", dict(COMMON, **MLA, q_lora_rank=None, n_shared_experts=2,
                                             routed_scaling_factor=1.5, topk_method="group_limited_greedy",
                                             n_group=2, topk_group=1),
                    "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", dict(COMMON, **MLA, q_lora_rank=12, n_shared_experts=1, n_group=2, topk_group=1,
                                             routed_scaling_factor=2.5, norm_topk_prob=True),
                    "DeepseekV3ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", dict(COMMON, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                       use_qk_norm=True, n_shared_experts=1, n_group=4, topk_group=2,
                                       routed_scaling_factor=1.8, norm_topk_prob=True),
                 "Glm4MoeForCausalLM"),
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_config(name: str, **overrides):
    return hf.hf_config(name, MODELS, **overrides)


def build_hf(name: str, seed: int = 0, **overrides):
    """A random model of architecture `name` in eval mode (fp32), its router's correction bias
    drawn too (transformers initialises it to 0)."""
    model = hf.build_hf(name, seed, MODELS, **overrides)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # sigmoid scores lie in (0, 1): 0.3 reorders them
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model


def write_mtp_layer(src: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """Add DeepSeek-V3's MTP module to the saved model in `src` (transformers' class never creates
    it), in the Hub's layout: layer num_hidden_layers (3) with a decoder layer's weights (an MoE
    layer, per-expert tensors), enorm, hnorm, eh_proj, shared_head.norm and its copies of the
    embedding (embed_tokens) and head (shared_head.head). Returns the tensors written."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)

    def draw(name: str, shape) -> torch.Tensor:
        if name.endswith("e_score_correction_bias"):
            return 0.3 * torch.randn(shape, generator=g)
        return 1.0 + 0.2 * torch.randn(shape, generator=g) if "norm" in name else 0.15 * torch.randn(shape, generator=g)

    mtp = {k.replace("model.layers.2.", "model.layers.3."): draw(k, v.shape) for k, v in state.items()
           if k.startswith("model.layers.2.")}
    p, D = "model.layers.3.", state["model.norm.weight"].shape[0]
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        mtp[p + name] = draw(name, (D,))
    mtp[p + "eh_proj.weight"] = draw("eh_proj.weight", (D, 2 * D))
    mtp[p + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    mtp[p + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    save_file({**state, **mtp}, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    return mtp
