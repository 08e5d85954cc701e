"""The Hugging Face architectures moe_dist reads and writes, and their config.json <-> moe_dist's
`model:` / `moe:` sections, shared by `import-hf` (importer.py) and `export-hf` (exporter.py).
The tensors are in tensors.py; the full tables are in docs/checkpoints.md.

What each computes (transformers' modeling files, checked against moe_dist by logits in
tests/unit/checkpoint/test_import_hf.py, tests/e2e/test_import_hf_train.py): pre-norm blocks, RMSNorm in fp32 times weight, rotary with
`rotate_half` over each head's two halves (moe_dist's `apply_rotary` is the same rotation, so
q/k rows map without a permutation), SDPA attention with 1/sqrt(head_dim), grouped-query heads
by `repeat_kv` (query head h reads key/value head h // (H / Y)), SwiGLU `down(silu(gate x) * up x)`.
Routers: softmax over all experts in fp32, top-k of the probabilities, then
- Mixtral: always renormalized to sum 1;
- Qwen2-MoE, Qwen3-MoE, OLMoE: renormalized iff `norm_topk_prob` (default false);
- Qwen2-MoE adds a shared expert of width `shared_expert_intermediate_size` times
  `sigmoid(x @ shared_expert_gate)`, and has q/k/v biases (`qkv_bias`, transformers < 5: always);
- Qwen3-MoE: RMSNorm of each query/key head (one weight of width head_dim), before rotary;
- OLMoE: RMSNorm over the whole q and the whole k projection, before rotary.
Qwen2/3-MoE layer i is MoE iff i not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step`
== 0; the others are dense SwiGLU of width `intermediate_size`.

A config.json field whose value moe_dist cannot compute exactly (sliding-window attention, a
rope scaling, another activation, biases it has no place for, clip_qkv, quantization, ...) is an
error naming the field and value, never an approximation. Fields config.json leaves out take
transformers' defaults for that architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.hf.deepseek import deepseek_blockers, deepseek_config, deepseek_sections

QWEN_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    name: str  # moe_dist's name (--architecture)
    display: str  # in messages
    model_type: str
    hf_class: str
    moe: bool  # an MoE architecture (else dense: import only)
    qk_norm: str = "none"  # moe_dist's model.qk_norm
    # q/k/v biases: "none" (attention_bias, which also biases o_proj, must be false), "field"
    # (config.json's qkv_bias, default true), "always" (Qwen2).
    qkv_bias: str = "none"
    moe_block: str = "mlp"  # the MoE FFN's module in the Hub layout
    expert_proj: tuple[str, str, str] = QWEN_PROJ  # one expert's gate, up, down in the Hub layout
    num_experts_key: str = "num_experts"
    expert_ff_key: str = "moe_intermediate_size"
    renormalize_key: str | None = "norm_topk_prob"  # None: always renormalized
    shared_expert: bool = False
    layer_pattern: bool = False  # decoder_sparse_step / mlp_only_layers
    sliding_flag: bool = True  # use_sliding_window enables sliding_window (else sliding_window alone)
    # The DeepSeek-V3 family's layout (DeepSeek-V2/V3, GLM-4.5): first_k_dense_replace dense layers,
    # then MoE layers with n_shared_experts shared experts and routed_scaling_factor (deepseek.py).
    deepseek: bool = False
    attention: str = "mha"  # moe_dist's model.attention
    # The checkpoint's rotary rows: "half" (rotate_half), "interleaved" (DeepSeek-V2's complex pairs),
    # "field" (DeepSeek-V3: interleaved iff rope_interleave, default true).
    rope_layout: str = "half"
    router_score: str = "softmax"  # moe_dist's router.score
    router_bias: bool = False  # the router's e_score_correction_bias (moe_dist's selection_bias_E)
    defaults: dict[str, Any] = field(default_factory=dict)


_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "initializer_range": 0.02, "attention_dropout": 0.0, "norm_topk_prob": False,
             "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "max_position_embeddings": 2048}
ARCHS = {a.name: a for a in (
    Arch("mixtral", "Mixtral", "mixtral", "MixtralForCausalLM", True, moe_block="block_sparse_moe",
         expert_proj=("w1", "w3", "w2"), num_experts_key="num_local_experts", expert_ff_key="intermediate_size",
         renormalize_key=None, sliding_flag=False, defaults={**_DEFAULTS, "rms_norm_eps": 1e-5, "rope_theta": 1e6}),
    Arch("qwen2_moe", "Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", True, qkv_bias="field", shared_expert=True,
         layer_pattern=True, defaults=_DEFAULTS),
    Arch("qwen3_moe", "Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", True, qk_norm="head", layer_pattern=True,
         defaults=_DEFAULTS),
    Arch("olmoe", "OLMoE", "olmoe", "OlmoeForCausalLM", True, qk_norm="full", expert_ff_key="intermediate_size",
         sliding_flag=False, defaults={**_DEFAULTS, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.01}),
    Arch("deepseek_v2", "DeepSeek-V2", "deepseek_v2", "DeepseekV2ForCausalLM", True, num_experts_key="n_routed_experts",
         renormalize_key=None, shared_expert=True, sliding_flag=False, deepseek=True, attention="mla",
         rope_layout="interleaved", defaults={**_DEFAULTS, "first_k_dense_replace": 0, "n_shared_experts": 2,
                                              "routed_scaling_factor": 1.0, "topk_method": "greedy",
                                              "q_lora_rank": 1536, "aux_loss_alpha": 0.001}),
    Arch("deepseek_v3", "DeepSeek-V3", "deepseek_v3", "DeepseekV3ForCausalLM", True, num_experts_key="n_routed_experts",
         shared_expert=True, sliding_flag=False, deepseek=True, attention="mla", rope_layout="field",
         router_score="sigmoid", router_bias=True,
         defaults={**_DEFAULTS, "first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                   "norm_topk_prob": True, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536,
                   "rope_interleave": True, "max_position_embeddings": 4096}),
    Arch("glm4_moe", "GLM-4.5", "glm4_moe", "Glm4MoeForCausalLM", True, num_experts_key="n_routed_experts",
         qkv_bias="attention_bias", shared_expert=True, sliding_flag=False, deepseek=True, router_score="sigmoid",
         router_bias=True,
         defaults={**_DEFAULTS, "rms_norm_eps": 1e-5, "first_k_dense_replace": 1, "n_shared_experts": 1,
                   "routed_scaling_factor": 1.0, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
                   "use_qk_norm": False, "partial_rotary_factor": 0.5, "max_position_embeddings": 131072}),
    Arch("llama", "Llama", "llama", "LlamaForCausalLM", False, sliding_flag=False, defaults=_DEFAULTS),
    Arch("qwen2", "Qwen2", "qwen2", "Qwen2ForCausalLM", False, qkv_bias="always", defaults=_DEFAULTS),
    Arch("qwen3", "Qwen3", "qwen3", "Qwen3ForCausalLM", False, qk_norm="head", defaults={**_DEFAULTS, "head_dim": 128}),
)}
MOE_ARCHS = tuple(a.name for a in ARCHS.values() if a.moe)
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}


# ---- config.json -> moe_dist --------------------------------------------------------------------

class _Fields:
    """config.json's values with the architecture's defaults, and the problems found."""

    def __init__(self, config: dict[str, Any], arch: Arch, path: str) -> None:
        self.config, self.arch, self.path = config, arch, path
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.config:
            return self.config[key]
        return self.arch.defaults.get(key, default)

    def required(self, key: str, alias: str | None = None) -> Any:
        if key not in self.config and alias in self.config:
            key = alias
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.problems.append(f"{key} is {value!r}, expected an integer >= 1"
                                 if key in self.config else f"{key} is missing (no default is assumed)")
            return 1
        return value

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.problems.append(f"{key} is {value!r}: {why}")


def find_arch(config: dict[str, Any], path: str) -> Arch:
    model_type = config.get("model_type")
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not one moe_dist imports; supported: "
                              f"{sorted(_BY_MODEL_TYPE)} ({', '.join(a.hf_class for a in ARCHS.values())})")
    classes = config.get("architectures") or [arch.hf_class]
    if classes != [arch.hf_class]:
        raise CheckpointError(f"{path}: architectures is {classes!r}; moe_dist imports model_type {model_type!r} "
                              f"as [{arch.hf_class!r}] only")
    return arch


def _rope_theta(f: _Fields) -> float:
    params = f.config.get("rope_parameters")
    scaling = f.config.get("rope_scaling")
    if scaling is not None:  # transformers 4's name; 5 moves it into rope_parameters
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            f.refuse("rope_scaling", scaling, "moe_dist has plain rotary embeddings only (rope_type 'default')")
    theta = f.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict) or "default" in params:  # per-layer-type parameters
            f.refuse("rope_parameters", params, "expected one {rope_type, rope_theta} mapping")
            return float(theta)
        if params.get("rope_type", "default") != "default":
            f.refuse("rope_parameters.rope_type", params.get("rope_type"),
                     "moe_dist has plain rotary embeddings only (rope_type 'default')")
        extra = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor"})
        if extra:
            f.refuse("rope_parameters", params, f"keys {extra} are not honoured by moe_dist's rotary embeddings")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            f.refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                     "moe_dist rotates the whole head")
        theta = params.get("rope_theta", theta)
    if f.config.get("partial_rotary_factor", 1.0) != 1.0:
        f.refuse("partial_rotary_factor", f.config["partial_rotary_factor"], "moe_dist rotates the whole head")
    return float(theta)


def _check_unsupported(f: _Fields) -> None:
    arch = f.arch
    if f.get("hidden_act") != "silu":
        f.refuse("hidden_act", f.get("hidden_act"), "moe_dist's FFNs are SwiGLU (silu)")
    if f.get("attention_dropout"):
        f.refuse("attention_dropout", f.get("attention_dropout"), "moe_dist's attention has no dropout")
    if f.config.get("quantization_config") is not None:
        f.refuse("quantization_config", f.config["quantization_config"], "moe_dist reads unquantized weights")
    if arch.sliding_flag:
        if f.get("use_sliding_window", False):
            f.refuse("use_sliding_window", True, "moe_dist's attention is full causal attention")
    elif f.get("sliding_window") is not None:
        f.refuse("sliding_window", f.get("sliding_window"), "moe_dist's attention is full causal attention")
    layer_types = f.config.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        f.refuse("layer_types", layer_types, "moe_dist's attention is full causal attention in every layer")
    if arch.qkv_bias not in ("field", "attention_bias") and f.get("attention_bias", False):
        f.refuse("attention_bias", True, "moe_dist has no attention biases in this architecture (o_proj's "
                                         "included)")
    if f.get("mlp_bias", False):
        f.refuse("mlp_bias", True, "moe_dist's FFNs have no biases")
    if f.get("clip_qkv") is not None:
        f.refuse("clip_qkv", f.get("clip_qkv"), "moe_dist does not clamp q/k/v")


def _moe_layer_pattern(f: _Fields, n_layers: int) -> tuple[int, int]:
    """(moe_every, moe_offset) whose MoE layers are the architecture's."""
    if not f.arch.layer_pattern:
        return 1, 0
    step, dense = f.get("decoder_sparse_step"), f.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        f.refuse("decoder_sparse_step", step, "expected an integer >= 1")
        return 1, 0
    layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if not layers:
        f.problems.append(f"no layer is MoE (decoder_sparse_step {step}, mlp_only_layers {dense}); import it "
                          f"as the dense model it is")
        return 1, 0
    offset = layers[0]
    every = layers[1] - layers[0] if len(layers) > 1 else n_layers
    if layers != list(range(offset, n_layers, every)):
        f.problems.append(f"the MoE layers {layers} (decoder_sparse_step {step}, mlp_only_layers {dense}) are not "
                          f"every k-th layer from some layer on, which is what moe_dist's moe_every / moe_offset "
                          f"express")
    return every, offset


def moe_dist_sections(config: dict[str, Any], path: str) -> tuple[Arch, dict[str, Any], dict[str, Any] | None]:
    """config.json -> (architecture, `model:` section, `moe:` section or None for dense). Every
    unsupported value is collected into one CheckpointError naming the file and the fields."""
    arch = find_arch(config, path)
    f = _Fields(config, arch, path)
    _check_unsupported(f)
    if arch.deepseek:
        model, moe = deepseek_sections(f)
        if f.problems:
            raise CheckpointError(f"{path}: moe_dist cannot import this {arch.hf_class} exactly: "
                                  + "; ".join(f.problems))
        return arch, model, moe
    D, L, H = f.required("hidden_size"), f.required("num_hidden_layers"), f.required("num_attention_heads")
    Y = f.get("num_key_value_heads") or H
    head_dim = f.get("head_dim") or D // H
    if arch.qk_norm == "full" and head_dim * H != D:
        f.refuse("head_dim", head_dim, f"OLMoE's q_norm has width hidden_size ({D}), so head_dim must be "
                                       f"hidden_size / num_attention_heads ({D // H})")
    if arch.qkv_bias == "field":
        bias = bool(f.get("qkv_bias", True))
    else:
        bias = arch.qkv_bias == "always"
    init_std = float(f.get("initializer_range"))
    model: dict[str, Any] = {
        "vocab_size": f.required("vocab_size"), "d_model": D, "n_layers": L, "n_heads": H,
        "d_ff": f.required("intermediate_size"), "max_seq_len": int(f.get("max_position_embeddings")),
        "activation": "swiglu", "tie_embeddings": bool(f.get("tie_word_embeddings")),
        "rope_theta": _rope_theta(f), "norm_eps": float(f.get("rms_norm_eps")), "init_std": init_std,
    }
    # Only what differs from moe_dist's defaults, so plain multi-head models need no new keys.
    if Y != H:
        model["n_kv_heads"] = Y
    if head_dim * H != D:
        model["head_dim"] = head_dim
    if arch.qk_norm != "none":
        model["qk_norm"] = arch.qk_norm
    if bias:
        model["qkv_bias"] = True
    moe = None
    if arch.moe:
        model["moe_every"], model["moe_offset"] = _moe_layer_pattern(f, L)
        renormalize = True if arch.renormalize_key is None else bool(f.get(arch.renormalize_key))
        # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (its attribute_map).
        other = "num_experts" if arch.num_experts_key == "num_local_experts" else "num_local_experts"
        moe = {"num_experts": f.required(arch.num_experts_key, other), "top_k": f.required("num_experts_per_tok"),
               "d_ff": f.required(arch.expert_ff_key), "activation": "swiglu", "dropless": True,
               "init_std": init_std, "ep_size": 1,
               "router": {"type": "topk", "renormalize": renormalize,
                          "jitter_eps": float(f.get("router_jitter_noise", 0.0))},
               "aux_loss": {"switch": float(f.get("router_aux_loss_coef")), "z_loss": 0.0}}
        if arch.shared_expert:
            moe.update(num_shared_experts=1, shared_d_ff=f.required("shared_expert_intermediate_size"),
                       shared_gate=True)
    if f.problems:
        raise CheckpointError(f"{path}: moe_dist cannot import this {arch.hf_class} exactly: "
                              + "; ".join(f.problems))
    return arch, model, moe


# ---- moe_dist -> config.json --------------------------------------------------------------------

def export_blockers(arch: Arch, cfg, selection_bias_active: bool) -> list[str]:
    """Why `arch` cannot express the moe_dist model `cfg` exactly (empty: it can).
    `selection_bias_active`: some MoE layer selects experts with a nonzero selection bias."""
    moe, name = cfg.moe, arch.display
    if moe is None:
        return ["the model has no MoE layers"]
    if arch.deepseek:
        return deepseek_blockers(arch, cfg, selection_bias_active)
    reasons = []
    if cfg.attention != "mha":
        reasons.append(f"model.attention is {cfg.attention!r}; {name}'s attention is standard (mha)")
    if cfg.partial_rotary_factor != 1.0:
        reasons.append(f"model.partial_rotary_factor is {cfg.partial_rotary_factor}; {name} rotates whole heads")
    if cfg.rope_scaling is not None:
        reasons.append(f"model.rope_scaling is set ({cfg.rope_scaling.type}); {name} is exported with plain rotary")
    dense_layers = cfg.moe_layer_indices != list(range(cfg.n_layers))
    if dense_layers and not arch.layer_pattern:
        reasons.append(f"not every layer is an MoE layer (moe_every {cfg.moe_every}, moe_offset {cfg.moe_offset})")
    if dense_layers and arch.layer_pattern and cfg.activation != "swiglu":
        reasons.append(f"dense layers use {cfg.activation!r}; {name}'s are SwiGLU")
    if moe.activation != "swiglu":
        reasons.append(f"experts use {moe.activation!r}; {name}'s experts are SwiGLU")
    if moe.comet_active_fraction is not None:
        reasons.append(f"experts mask hidden units (moe.comet_active_fraction); {name}'s do not")
    if arch.shared_expert:
        if not moe.num_shared_experts:
            reasons.append(f"no shared expert; {name} always has one")
        elif not moe.shared_gate:
            reasons.append(f"the shared expert has no sigmoid gate (moe.shared_gate false); {name}'s has one")
    elif moe.num_shared_experts:
        reasons.append(f"{moe.num_shared_experts} shared expert(s); {name} has none")
    if cfg.qk_norm != arch.qk_norm:
        reasons.append(f"model.qk_norm is {cfg.qk_norm!r}; " + (f"{name} has no q/k norm" if arch.qk_norm == "none"
                                                                else f"{name}'s is {arch.qk_norm!r}"))
    if cfg.qkv_bias and arch.qkv_bias == "none":
        reasons.append(f"model.qkv_bias is true; {name}'s q/k/v projections have no bias")
    if arch.qk_norm == "full" and cfg.n_heads * cfg.head_dim != cfg.d_model:
        reasons.append(f"n_heads * head_dim ({cfg.n_heads} * {cfg.head_dim}) differs from d_model "
                       f"({cfg.d_model}); {name}'s q_norm is d_model wide")
    if moe.hash_layers:
        reasons.append(f"moe.hash_layers is {moe.hash_layers} (the first MoE layers route by token id); {name} has "
                       f"the learned softmax top-k router only")
    router = moe.router
    if router.type != "topk":
        reasons.append(f"router type {router.type!r}; {name} has the learned softmax top-k router only")
        return reasons
    if router.score != "softmax":
        reasons.append(f"router.score is {router.score!r}; {name}'s router is a softmax")
    if router.scale != 1.0:
        reasons.append(f"router.scale is {router.scale!r}; {name}'s weights are not scaled")
    if arch.renormalize_key is None and not renormalized(router):
        reasons.append(f"router.renormalize is false with top_k 1 (weight p, not 1 as in {name})" if moe.top_k == 1
                       else f"router.renormalize is false; {name} renormalizes the top-k probabilities")
    if router.bias_balancing and selection_bias_active:
        reasons.append(f"the aux-loss-free selection bias is nonzero; {name} selects by probability alone")
    return reasons


def renormalized(router) -> bool:
    # The softmax over the K chosen logits is the renormalized top-k of the softmax.
    return bool(router.renormalize or router.score_after_topk)


def hf_config(arch: Arch, cfg, token_ids: dict[str, int | None], dtype_name: str) -> dict[str, Any]:
    """config.json of `arch` for the moe_dist model `cfg` (which `export_blockers` accepted)."""
    if arch.deepseek:
        return deepseek_config(arch, cfg, token_ids, dtype_name)
    moe = cfg.moe
    out = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, transformers 4 rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        arch.num_experts_key: moe.num_experts, "num_experts_per_tok": moe.top_k, arch.expert_ff_key: moe.d_ff,
        "output_router_logits": False, "router_aux_loss_coef": moe.aux_loss.switch,
        "use_cache": True, "dtype": dtype_name, **token_ids,
    }
    if arch.renormalize_key is not None:
        out[arch.renormalize_key] = renormalized(moe.router)
    if arch.name == "mixtral":
        out.update(sliding_window=None, router_jitter_noise=moe.router.jitter_eps)
    if arch.sliding_flag:
        out.update(use_sliding_window=False, sliding_window=None)
    if arch.layer_pattern:
        moe_layers = set(cfg.moe_layer_indices)
        out.update(intermediate_size=cfg.d_ff, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_layers])
    if arch.qkv_bias == "field":
        out["qkv_bias"] = bool(cfg.qkv_bias)
    elif arch.qkv_bias == "none":
        out["attention_bias"] = False
    if arch.shared_expert:
        out["shared_expert_intermediate_size"] = moe.shared_d_ff
    if arch.name == "olmoe":
        out["clip_qkv"] = None
    return out
