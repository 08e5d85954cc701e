"""moe_dist -> Hugging Face `MixtralForCausalLM`, for models Mixtral can express exactly.

Mixtral (transformers' modeling_mixtral.py) computes, per layer: x + attn(rmsnorm(x)), then
x + moe(rmsnorm(x)) with router `softmax(x W_g^T)` in fp32, top-k, renormalized to sum 1, and
SwiGLU experts `w2(silu(w1 x) * w3 x)`; rotary half-split (rotate_half) with theta; RMSNorm in
fp32 then times weight. Expressible moe_dist models therefore have: every layer MoE (moe_every 1,
moe_offset 0), SwiGLU experts, the `topk` router with renormalize true (top-1 included) and no
active selection bias, no shared experts. Attention (MHA, no bias, causal, 1/sqrt(d) scale),
rotary layout, RMSNorm and tied/untied embeddings map one to one. Mixtral never drops tokens, so
its logits equal moe_dist's when moe_dist's eval capacity drops nothing.

Weights are written in the Hub's Mixtral layout (per expert w1/w2/w3), which transformers 5
fuses on load and transformers 4, vLLM and llama.cpp read as is:

    embed.weight                          -> model.embed_tokens.weight
    blocks.i.attn_norm.weight_D           -> model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.weight [3D, D]      -> model.layers.i.self_attn.{q,k,v}_proj.weight (rows 0:D, D:2D, 2D:3D)
    blocks.i.attn.out.weight              -> model.layers.i.self_attn.o_proj.weight
    blocks.i.ffn_norm.weight_D            -> model.layers.i.post_attention_layernorm.weight
    blocks.i.moe.router.gate.weight_ED    -> model.layers.i.block_sparse_moe.gate.weight
    blocks.i.moe.experts.w_in_eDF [E,D,2F] -> ...experts.e.w1.weight = w_in[e][:, :F]^T (gate), w3 = w_in[e][:, F:]^T (up)
    blocks.i.moe.experts.w_out_eFD [E,F,D] -> ...experts.e.w2.weight = w_out[e]^T
    norm.weight_D                         -> model.norm.weight
    lm_head.weight (untied only)          -> lm_head.weight
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe_dist.model.config import ModelConfig


def mixtral_blockers(cfg: ModelConfig, state: dict[str, Tensor]) -> list[str]:
    """Why Mixtral cannot express this model (empty: it can)."""
    moe = cfg.moe
    if moe is None:
        return ["the model has no MoE layers"]
    reasons = []
    if cfg.moe_layer_indices != list(range(cfg.n_layers)):
        reasons.append(f"not every layer is an MoE layer (moe_every {cfg.moe_every}, moe_offset {cfg.moe_offset})")
    if moe.activation != "swiglu":
        reasons.append(f"experts use {moe.activation!r}; Mixtral's experts are SwiGLU")
    if moe.num_shared_experts:
        reasons.append(f"{moe.num_shared_experts} shared expert(s); Mixtral has none")
    router = moe.router
    if router.type != "topk":
        reasons.append(f"router type {router.type!r}; Mixtral has the learned softmax top-k router only")
        return reasons
    if not router.renormalize and moe.top_k > 1:
        reasons.append("router.renormalize is false; Mixtral renormalizes the top-k probabilities")
    if not router.renormalize and moe.top_k == 1:
        reasons.append("router.renormalize is false with top_k 1 (weight p, not 1 as in Mixtral)")
    if router.bias_balancing and any(bool(state[f"blocks.{i}.moe.router.selection_bias_E"].any())
                                     for i in cfg.moe_layer_indices):
        reasons.append("the aux-loss-free selection bias is nonzero; Mixtral selects by probability alone")
    return reasons


def mixtral_config(cfg: ModelConfig, token_ids: dict[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    moe = cfg.moe
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": moe.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, transformers 4 rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": moe.aux_loss.switch,
        "router_jitter_noise": moe.router.jitter_eps,
        "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
        **token_ids,
    }


def mixtral_state(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    D, F = cfg.d_model, cfg.moe.d_ff
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight_D"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        qkv = state[src + "attn.qkv.weight"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = qkv[j * D:(j + 1) * D]
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.out.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight_D"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight_D"]
        out[dst + "block_sparse_moe.gate.weight"] = state[src + "moe.router.gate.weight_ED"]
        w_in_EDF, w_out_EFD = state[src + "moe.experts.w_in_eDF"], state[src + "moe.experts.w_out_eFD"]
        for e in range(cfg.moe.num_experts):
            expert = f"{dst}block_sparse_moe.experts.{e}."
            out[expert + "w1.weight"] = w_in_EDF[e, :, :F].t()
            out[expert + "w3.weight"] = w_in_EDF[e, :, F:].t()
            out[expert + "w2.weight"] = w_out_EFD[e].t()
    return out
