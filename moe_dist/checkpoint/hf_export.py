"""`export-hf`: a training or consolidated checkpoint -> a directory transformers loads:
config.json, model.safetensors and, for a checkpoint trained with a SentencePiece model,
tokenizer files. Mixtral when it can express the model exactly (no custom code), otherwise the
self-contained custom architecture (`trust_remote_code=True`).

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
    blocks.i.attn.qkv.weight [(H+2Y)A, D] -> model.layers.i.self_attn.{q,k,v}_proj.weight (rows [q: H*A; k: Y*A; v: Y*A])
    blocks.i.attn.out.weight              -> model.layers.i.self_attn.o_proj.weight
    blocks.i.ffn_norm.weight_D            -> model.layers.i.post_attention_layernorm.weight
    blocks.i.moe.router.gate.weight_ED    -> model.layers.i.block_sparse_moe.gate.weight
    blocks.i.moe.experts.w_in_eDF [E,D,2F] -> ...experts.e.w1.weight = w_in[e][:, :F]^T (gate), w3 = w_in[e][:, F:]^T (up)
    blocks.i.moe.experts.w_out_eFD [E,F,D] -> ...experts.e.w2.weight = w_out[e]^T
    norm.weight_D                         -> model.norm.weight
    lm_head.weight (untied only)          -> lm_head.weight

The custom architecture (`auto_map` in config.json) loads with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` without moe_dist installed. Its
modeling file (`hf_remote_code/modeling_moe_dist.py`, copied into OUT) mirrors `MoETransformer`
module for module, so the mapping is the identity plus a prefix: moe_dist's ep_size=1 tensor
`<name>` is `model.<name>` (router statistics buffers included), and config.json carries
moe_dist's `model` and `moe` sections as `moe_dist_model` / `moe_dist_moe`. It implements
multi-head attention without bias or q/k norm, softmax routers and ungated shared experts of
width d_ff * num_shared_experts; a model using a feature beyond that (`custom_blockers`) and that
Mixtral cannot express either is refused, naming the fields.

The tokenizer. A checkpoint trained with a SentencePiece model gets `tokenizer.model` (the same
file, checked against the digest the trainer recorded) and the fast `tokenizer.json` that
transformers' `LlamaTokenizer` converts it to (BPE or unigram, byte fallback, no BOS/EOS added).
It reproduces moe_dist's ids except at the very start of a text that begins with whitespace:
SentencePiece always adds its dummy-prefix piece there, while transformers skips the prefix when
the text already starts with a space (one piece fewer). Decoding is identical. The built-in byte
tokenizer has no transformers counterpart: the export records its special ids in config.json
(end-of-document 256) and writes no tokenizer files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_dist.checkpoint import hf_remote_code
from moe_dist.checkpoint.consolidated import full_state_dict, open_checkpoint
from moe_dist.checkpoint.files import (SAFETENSORS, CheckpointError, cast_floating, check_option,
                                       check_output, dtype_name, staged_directory, torch_dtype, write_json,
                                       write_weights)
from moe_dist.common.config import to_dict
from moe_dist.model.config import ModelConfig

ARCHITECTURES = ("auto", "mixtral", "custom")
CONFIG_MODULE, MODELING_MODULE = "configuration_moe_dist", "modeling_moe_dist"
# moe_dist.data.tokenizer.BYTE_EOD; not imported: that module pulls in Megatron-Core.
BYTE_EOD = 256


# ---- Mixtral -----------------------------------------------------------------------------------

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
    if cfg.qk_norm != "none":
        reasons.append(f"model.qk_norm is {cfg.qk_norm!r}; Mixtral has no q/k norm")
    if cfg.qkv_bias:
        reasons.append("model.qkv_bias is true; Mixtral's q/k/v projections have no bias")
    router = moe.router
    if router.type != "topk":
        reasons.append(f"router type {router.type!r}; Mixtral has the learned softmax top-k router only")
        return reasons
    if router.score != "softmax":
        reasons.append(f"router.score is {router.score!r}; Mixtral's router is a softmax")
    if router.scale != 1.0:
        reasons.append(f"router.scale is {router.scale!r}; Mixtral's weights are not scaled")
    # The softmax over the K chosen logits is the renormalized top-k probabilities: both are Mixtral.
    if not (router.renormalize or router.score_after_topk) and moe.top_k > 1:
        reasons.append("router.renormalize is false; Mixtral renormalizes the top-k probabilities")
    if not (router.renormalize or router.score_after_topk) and moe.top_k == 1:
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
        "num_key_value_heads": cfg.n_kv_heads,
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
        "dtype": dtype_name(dtype),
        **token_ids,
    }


def mixtral_state(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    F = cfg.moe.d_ff
    widths = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight_D"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for name, rows in zip(("q_proj", "k_proj", "v_proj"), state[src + "attn.qkv.weight"].split(widths)):
            out[f"{dst}self_attn.{name}.weight"] = rows
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


# ---- the custom architecture -------------------------------------------------------------------

def custom_blockers(cfg: ModelConfig) -> list[str]:
    """The config fields whose non-default values `hf_remote_code/modeling_moe_dist.py` does not
    implement (empty: it computes this model): exporting would silently compute another model."""
    reasons = []
    if cfg.n_kv_heads != cfg.n_heads:
        reasons.append(f"model.n_kv_heads {cfg.n_kv_heads} (n_heads {cfg.n_heads})")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        reasons.append(f"model.head_dim {cfg.head_dim} (d_model / n_heads is {cfg.d_model / cfg.n_heads:g})")
    if cfg.qk_norm != "none":
        reasons.append(f"model.qk_norm {cfg.qk_norm!r}")
    if cfg.qkv_bias:
        reasons.append("model.qkv_bias true")
    moe = cfg.moe
    if moe is not None:
        if moe.num_shared_experts and moe.shared_d_ff != moe.d_ff * moe.num_shared_experts:
            reasons.append(f"moe.shared_d_ff {moe.shared_d_ff} (d_ff * num_shared_experts is "
                           f"{moe.d_ff * moe.num_shared_experts})")
        if moe.shared_gate:
            reasons.append("moe.shared_gate true")
        router = moe.router
        if getattr(router, "score", "softmax") != "softmax":
            reasons.append(f"moe.router.score {router.score!r}")
        if getattr(router, "score_after_topk", False):
            reasons.append("moe.router.score_after_topk true")
        if getattr(router, "scale", 1.0) != 1.0:
            reasons.append(f"moe.router.scale {router.scale!r}")
    return reasons


def custom_config(cfg: ModelConfig, token_ids: dict[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    model = to_dict(cfg)
    moe = model.pop("moe")
    return {
        "architectures": ["MoEDistForCausalLM"],
        "model_type": "moe_dist",
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.MoEDistConfig",
                     "AutoModelForCausalLM": f"{MODELING_MODULE}.MoEDistForCausalLM"},
        "moe_dist_model": model,
        "moe_dist_moe": moe,
        # No KV cache in the exported model: generation must recompute the sequence.
        "use_cache": False,
        "dtype": dtype_name(dtype),
        **token_ids,
    }


def custom_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"model.{name}": t for name, t in state.items()}


def copy_modeling_files(out_dir: str) -> None:
    src = os.path.dirname(hf_remote_code.__file__)
    for module in (CONFIG_MODULE, MODELING_MODULE):
        shutil.copyfile(os.path.join(src, f"{module}.py"), os.path.join(out_dir, f"{module}.py"))


# ---- the tokenizer -----------------------------------------------------------------------------

def sentencepiece_model(tokenizer: dict[str, Any], recorded: dict[str, Any] | None, override: str | None) -> str | None:
    """Path of the SentencePiece model to export (None for the byte tokenizer), verified against
    the sha256 the trainer recorded when it has one."""
    if tokenizer.get("kind") != "sentencepiece":
        return None
    path = override or tokenizer.get("model")
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"the checkpoint's tokenizer is the SentencePiece model {tokenizer.get('model')!r}, "
                              f"which does not exist here{f' (nor {override!r})' if override else ''}; pass "
                              f"--tokenizer-model PATH")
    digest = ((recorded or {}).get("unique_identifiers") or {}).get("sha256")
    if digest is not None:
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != digest:
            raise CheckpointError(f"SentencePiece model {path!r} has sha256 {actual}, but the checkpoint was "
                                  f"trained with one whose sha256 is {digest}")
    return path


def special_token_ids(sp_model: str | None) -> dict[str, int | None]:
    if sp_model is None:
        return {"bos_token_id": None, "eos_token_id": BYTE_EOD, "pad_token_id": None}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    return {k: (v if v >= 0 else None) for k, v in
            (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id()))}


def write_tokenizer(sp_model: str | None, out_dir: str, max_length: int) -> None:
    """tokenizer.json (+ tokenizer_config.json) as transformers' LlamaTokenizer converts the
    SentencePiece model, and the model itself as tokenizer.model. The fast tokenizer.json is what
    makes AutoTokenizer right whatever config.json's model_type maps to (for `mixtral` it picks
    the generic TokenizersBackend, which reads only tokenizer.json)."""
    if sp_model is None:
        return
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        raise CheckpointError("exporting a SentencePiece tokenizer needs transformers: pip install "
                              "'moe_dist[hf]'") from None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    with tempfile.TemporaryDirectory() as src:
        shutil.copyfile(sp_model, os.path.join(src, "tokenizer.model"))
        write_json(os.path.join(src, "tokenizer_config.json"), {
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
            "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()), "clean_up_tokenization_spaces": False})
        tokenizer = LlamaTokenizer.from_pretrained(src)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))


# ---- the export --------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: str
    architecture: str  # "mixtral" or "custom"
    reasons: list[str] = field(default_factory=list)  # why not Mixtral (custom exports)
    tokenizer: bool = False  # tokenizer files written


def export_hf(ckpt_path: str, out: str, *, tag: str | None = None, architecture: str = "auto",
              master_weights: bool = False, dtype: str | None = None, tokenizer_model: str | None = None,
              overwrite: bool = False, progress: bool = True) -> ExportResult:
    check_option("architecture", architecture, ARCHITECTURES)
    cast = torch_dtype(dtype)
    check_output(out, overwrite)
    ckpt = open_checkpoint(ckpt_path, tag)
    cfg = ckpt.model_cfg
    sp_model = sentencepiece_model((ckpt.config.get("data") or {}).get("tokenizer") or {"kind": "byte"},
                                   ckpt.recorded_tokenizer, tokenizer_model)
    state = cast_floating(full_state_dict(ckpt, master_weights, progress), cast)
    reasons = mixtral_blockers(cfg, state)
    if architecture == "mixtral" and reasons:
        raise CheckpointError(f"Mixtral cannot express the model of {ckpt_path!r}: {'; '.join(reasons)}; "
                              f"export with --architecture custom (or auto)")
    use_mixtral = architecture == "mixtral" or (architecture == "auto" and not reasons)
    unsupported = [] if use_mixtral else custom_blockers(cfg)
    if unsupported:
        raise CheckpointError(f"the custom (remote-code) architecture cannot express the model of {ckpt_path!r}: "
                              f"it does not implement {'; '.join(unsupported)}; and Mixtral cannot either: "
                              f"{'; '.join(reasons)}")
    token_ids = special_token_ids(sp_model)
    weight_dtype = state["embed.weight"].dtype
    with staged_directory(out, overwrite) as tmp:
        if use_mixtral:
            config, weights = mixtral_config(cfg, token_ids, weight_dtype), mixtral_state(cfg, state)
        else:
            config, weights = custom_config(cfg, token_ids, weight_dtype), custom_state(state)
            copy_modeling_files(tmp)
        write_json(os.path.join(tmp, "config.json"), config)
        write_weights(os.path.join(tmp, "model.safetensors"), weights, SAFETENSORS, metadata={"format": "pt"})
        write_tokenizer(sp_model, tmp, cfg.max_seq_len)
    return ExportResult(out=out, architecture="mixtral" if use_mixtral else "custom",
                        reasons=[] if use_mixtral else reasons, tokenizer=sp_model is not None)
