"""config.json <-> moe_dist for the DeepSeek-V3 family: DeepseekV2ForCausalLM,
DeepseekV3ForCausalLM and Glm4MoeForCausalLM (GLM-4.5), as transformers' modeling files compute
them (checked by logits in tests/unit/checkpoint/test_import_deepseek.py).

- Layout: layers i < `first_k_dense_replace` are dense SwiGLU of width `intermediate_size`
  (moe_dist's `model.d_ff`), every later layer is MoE (`moe_offset` = first_k_dense_replace,
  `moe_every` 1) with experts of width `moe_intermediate_size` and one shared SwiGLU of width
  `moe_intermediate_size * n_shared_experts` added ungated (`moe.num_shared_experts`,
  `shared_d_ff`, `shared_gate` false).
- Attention: DeepSeek-V2/V3 multi-head latent attention (`model.attention: mla`, q_lora_rank
  None for a full-rank query); GLM-4.5 standard grouped-query attention with q/k/v biases
  (`attention_bias`; o_proj has none), optional per-head q/k RMSNorm (`use_qk_norm`) and rotary
  over the first `partial_rotary_factor` of each head (transformers' default 0.5).
- Rotary: `rope_type` default or yarn (`model.rope_scaling`; latent attention also scales the
  softmax by YaRN's mscale² where `mscale_all_dim` is set). DeepSeek-V2 (always) and V3 (with
  `rope_interleave`, its default) rotate interleaved pairs; tensors.py permutes those rows.
- Router, in fp32: DeepSeek-V2 softmax, top-k of the probabilities, never renormalized (its
  `norm_topk_prob` is not read by transformers' class, so true is refused as ambiguous);
  DeepSeek-V3 / GLM-4.5 sigmoid scores, experts chosen by score + `e_score_correction_bias`
  (moe_dist's aux-loss-free `selection_bias_E`, `router.bias_balancing`), weights the chosen
  scores, renormalized iff `norm_topk_prob`; then times `routed_scaling_factor` (`router.scale`).
- Groups: experts in `n_group` contiguous groups, only the `topk_group` best may be chosen
  (`router.expert_groups`, `topk_groups`), ranked by the sum of their two best biased scores
  (DeepSeek-V3's noaux_tc, GLM-4.5: `group_score` top2_sum) or their best probability
  (DeepSeek-V2's group_limited_greedy: max); DeepSeek-V2's greedy ignores the groups.
- Multi-token prediction (DeepSeek-V3's layer num_hidden_layers): importer.py and tensors.py.
"""

from __future__ import annotations

from typing import Any

# `f` below is arch.py's `_Fields` (config.json's values with the architecture's defaults, and the
# problems found) and `arch` its `Arch`; not imported, as arch.py imports this module.

_YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len",
              "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
              "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor", "truncate": "truncate"}


def _rope(f, model: dict[str, Any]) -> None:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (4) -> rope_theta,
    partial_rotary_factor and rope_scaling of `model`."""
    params = f.config.get("rope_parameters")
    if params is None:
        scaling = f.config.get("rope_scaling")
        params = {"rope_theta": f.get("rope_theta"), **(scaling if isinstance(scaling, dict) else {})}
        if scaling is not None and not isinstance(scaling, dict):
            f.refuse("rope_scaling", scaling, "expected a mapping")
    if not isinstance(params, dict) or "default" in params:
        f.refuse("rope_parameters", params, "expected one {rope_type, rope_theta, ...} mapping")
        return
    kind = params.get("rope_type", params.get("type", "default"))
    model["rope_theta"] = float(params.get("rope_theta", f.get("rope_theta")))
    partial = params.get("partial_rotary_factor", f.config.get("partial_rotary_factor",
                                                                f.arch.defaults.get("partial_rotary_factor", 1.0)))
    if f.arch.attention == "mla":
        if partial != 1.0:
            f.refuse("partial_rotary_factor", partial, "latent attention's rotary width is qk_rope_head_dim")
    elif partial != 1.0:
        model["partial_rotary_factor"] = float(partial)
    allowed = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if kind == "yarn":
        allowed |= set(_YARN_KEYS)
        scaling = {"type": "yarn", **{ours: params[theirs] for theirs, ours in _YARN_KEYS.items()
                                      if params.get(theirs) is not None}}
        if "factor" not in scaling and "original_max_seq_len" in scaling:
            scaling["factor"] = f.get("max_position_embeddings") / scaling["original_max_seq_len"]
        missing = [k for k in ("factor", "original_max_position_embeddings") if _YARN_KEYS[k] not in scaling]
        if missing:
            f.refuse("rope_parameters", params, f"yarn needs {missing}")
        else:
            model["rope_scaling"] = scaling
    elif kind != "default":
        f.refuse("rope_parameters.rope_type", kind, "moe_dist implements rope_type 'default' and 'yarn' only")
    extra = sorted(set(params) - allowed)
    if extra:
        f.refuse("rope_parameters", params, f"keys {extra} are not honoured by moe_dist's rotary embeddings")


# How each architecture ranks groups (moe_dist's router.group_score): DeepSeek-V3's noaux_tc and
# GLM-4.5 by the sum of a group's two best selection scores, DeepSeek-V2's group_limited_greedy by
# its best probability.
GROUP_SCORE = {"deepseek_v2": "max", "deepseek_v3": "top2_sum", "glm4_moe": "top2_sum"}


def _groups(f, num_experts: int, top_k: int) -> dict[str, Any]:
    """The router's group-limited selection keys (empty: plain top-k) from n_group / topk_group
    (and DeepSeek-V2's topk_method: `greedy` ignores the groups)."""
    arch = f.arch
    if arch.name == "deepseek_v2":
        method = f.get("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            f.refuse("topk_method", method, "DeepSeek-V2 routes 'greedy' or 'group_limited_greedy'")
            return {}
        if method == "greedy":  # transformers' greedy branch never reads n_group / topk_group
            return {}
    else:
        method = f.config.get("topk_method")
        if method not in (None, "noaux_tc"):  # not read by transformers' class: it always routes noaux_tc
            f.refuse("topk_method", method, f"{arch.display} routes 'noaux_tc' only (transformers' class does not "
                                            f"read this field); set it 'noaux_tc' or leave it out")
            return {}
    n_group, topk_group = f.get("n_group"), f.get("topk_group")
    if not _positive_int(n_group) or num_experts % n_group:
        f.refuse("n_group", n_group, f"expected an integer >= 1 dividing n_routed_experts ({num_experts})")
        return {}
    if not _positive_int(topk_group) or topk_group > n_group:
        f.refuse("topk_group", topk_group, f"expected an integer in [1, n_group ({n_group})]")
        return {}
    per_group, score = num_experts // n_group, GROUP_SCORE[arch.name]
    if score == "top2_sum" and per_group < 2:
        f.refuse("n_group", n_group, f"{arch.display} ranks a group by the sum of its two best scores, so each of "
                                     f"the n_group groups needs >= 2 of the n_routed_experts ({num_experts})")
        return {}
    if top_k > topk_group * per_group:
        f.refuse("topk_group", topk_group, f"the topk_group best groups hold topk_group x {per_group} experts "
                                           f"(n_routed_experts / n_group), fewer than num_experts_per_tok ({top_k})")
        return {}
    if topk_group == n_group:  # every group may be chosen: plain top-k
        return {}
    return {"expert_groups": n_group, "topk_groups": topk_group, "group_score": score}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def deepseek_sections(f) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`model:`, `moe:`) of a DeepSeek-V2/V3 or GLM-4.5 config.json; problems go to `f`."""
    arch = f.arch
    D, L, H = f.required("hidden_size"), f.required("num_hidden_layers"), f.required("num_attention_heads")
    init_std = float(f.get("initializer_range"))
    model: dict[str, Any] = {
        "vocab_size": f.required("vocab_size"), "d_model": D, "n_layers": L, "n_heads": H,
        "d_ff": f.required("intermediate_size"), "max_seq_len": int(f.get("max_position_embeddings")),
        "activation": "swiglu", "tie_embeddings": bool(f.get("tie_word_embeddings")),
        "norm_eps": float(f.get("rms_norm_eps")), "init_std": init_std,
    }
    _rope(f, model)
    Y = f.get("num_key_value_heads") or H
    if arch.attention == "mla":
        if Y != H:
            f.refuse("num_key_value_heads", Y, f"latent attention expands the latent into every head; transformers "
                                               f"needs num_attention_heads ({H})")
        if f.get("attention_bias", False):
            f.refuse("attention_bias", True, "moe_dist's latent attention has no biases")
        q_lora = f.get("q_lora_rank")
        model.update(attention="mla", q_lora_rank=None if q_lora is None else f.required("q_lora_rank"),
                     kv_lora_rank=f.required("kv_lora_rank"), qk_rope_head_dim=f.required("qk_rope_head_dim"),
                     qk_nope_head_dim=f.required("qk_nope_head_dim"), v_head_dim=f.required("v_head_dim"))
    else:
        head_dim = f.get("head_dim") or D // H
        if Y != H:
            model["n_kv_heads"] = Y
        if head_dim * H != D:
            model["head_dim"] = head_dim
        if f.get("use_qk_norm"):
            model["qk_norm"] = "head"
        if f.get("attention_bias", False):
            model["qkv_bias"] = True
    dense = f.get("first_k_dense_replace")
    if not isinstance(dense, int) or isinstance(dense, bool) or not 0 <= dense < L:
        f.refuse("first_k_dense_replace", dense, f"expected an integer in [0, num_hidden_layers ({L})): moe_dist "
                                                 f"imports models with at least one MoE layer")
        dense = 0
    model["moe_every"], model["moe_offset"] = 1, dense
    expert_ff = f.required("moe_intermediate_size")
    shared = f.get("n_shared_experts")
    if not isinstance(shared, int) or isinstance(shared, bool) or shared < 1:
        f.refuse("n_shared_experts", shared, "expected an integer >= 1")
        shared = 1
    if arch.router_score == "softmax":
        if f.get("norm_topk_prob"):
            f.refuse("norm_topk_prob", True, "transformers' DeepseekV2 never renormalizes (it does not read this "
                                             "field); set it false")
        router = {"type": "topk", "renormalize": False}
        aux = float(f.get("aux_loss_alpha"))
    else:
        router = {"type": "topk", "score": "sigmoid", "bias_balancing": True,
                  "renormalize": bool(f.get("norm_topk_prob"))}
        aux = 0.0  # aux-loss-free: the selection bias balances
    num_experts, top_k = f.required(arch.num_experts_key, "num_local_experts"), f.required("num_experts_per_tok")
    router.update(_groups(f, num_experts, top_k))
    scale = f.get("routed_scaling_factor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        f.refuse("routed_scaling_factor", scale, "expected a number > 0")
    elif scale != 1.0:
        router["scale"] = float(scale)
    moe = {"num_experts": num_experts, "top_k": top_k, "d_ff": expert_ff, "activation": "swiglu", "dropless": True,
           "init_std": init_std, "ep_size": 1, "num_shared_experts": shared, "shared_d_ff": expert_ff * shared,
           "router": router, "aux_loss": {"switch": aux, "z_loss": 0.0}}
    return model, moe


# ---- moe_dist -> config.json --------------------------------------------------------------------

def deepseek_blockers(arch, cfg, selection_bias_active: bool) -> list[str]:
    """Why `arch` (DeepSeek-V2/V3, GLM-4.5) cannot express the moe_dist model `cfg` (empty: it can)."""
    moe, name, reasons = cfg.moe, arch.display, []
    if cfg.attention != arch.attention:
        reasons.append(f"model.attention is {cfg.attention!r}; {name}'s is {arch.attention!r}")
    if cfg.qk_norm == "full":
        reasons.append(f"model.qk_norm is 'full'; {name}'s q/k norm, if any, is per head")
    if cfg.moe_every != 1:
        reasons.append(f"model.moe_every is {cfg.moe_every}; {name}'s layers are all MoE after the first "
                       f"first_k_dense_replace")
    if cfg.moe_offset and cfg.activation != "swiglu":
        reasons.append(f"dense layers use {cfg.activation!r}; {name}'s are SwiGLU")
    if moe.activation != "swiglu":
        reasons.append(f"experts use {moe.activation!r}; {name}'s experts are SwiGLU")
    if moe.comet_active_fraction is not None:
        reasons.append(f"experts mask hidden units (moe.comet_active_fraction); {name}'s do not")
    if not moe.num_shared_experts or moe.shared_gate or moe.shared_d_ff != moe.d_ff * moe.num_shared_experts:
        reasons.append(f"{name} has n_shared_experts >= 1 ungated shared experts of width moe_intermediate_size each "
                       f"(moe.num_shared_experts {moe.num_shared_experts}, shared_d_ff {moe.shared_d_ff}, "
                       f"shared_gate {moe.shared_gate}, d_ff {moe.d_ff})")
    router = moe.router
    if router.type != "topk":
        return reasons + [f"router type {router.type!r}; {name} has the learned top-k router only"]
    if router.score != arch.router_score:
        reasons.append(f"router.score is {router.score!r}; {name}'s is {arch.router_score!r}")
    if router.score_after_topk:
        reasons.append(f"router.score_after_topk is true; {name} weights by the chosen scores")
    if arch.router_score == "softmax" and router.renormalize:
        reasons.append(f"router.renormalize is true; {name} never renormalizes")
    if not arch.router_bias and router.bias_balancing and selection_bias_active:
        reasons.append(f"the aux-loss-free selection bias is nonzero; {name} selects by probability alone")
    if router.topk_groups < router.expert_groups and router.group_score != GROUP_SCORE[arch.name]:
        reasons.append(f"router.group_score is {router.group_score!r}; {name} ranks expert groups by "
                       f"{GROUP_SCORE[arch.name]!r}")
    return reasons


def deepseek_config(arch, cfg, token_ids: dict[str, int | None], dtype_name: str) -> dict[str, Any]:
    """config.json of `arch` for `cfg` (which `deepseek_blockers` accepted)."""
    moe, router = cfg.moe, cfg.moe.router
    limited = router.topk_groups < router.expert_groups
    # Without a limit every group may be chosen: one group says the same to every reader.
    n_group, topk_group = (router.expert_groups, router.topk_groups) if limited else (1, 1)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type="yarn", factor=s.factor, original_max_position_embeddings=s.original_max_seq_len,
                    beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim,
                    truncate=s.truncate)
        if s.attention_factor is not None:
            rope["attention_factor"] = s.attention_factor
    out = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "intermediate_size": cfg.d_ff, "moe_intermediate_size": moe.d_ff, "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k, "n_shared_experts": moe.num_shared_experts,
        "first_k_dense_replace": cfg.moe_offset, "routed_scaling_factor": moe.router.scale,
        "norm_topk_prob": bool(moe.router.renormalize), "n_group": n_group, "topk_group": topk_group,
        "output_router_logits": False, "use_cache": True, "dtype": dtype_name, **token_ids,
    }
    if arch.attention == "mla":
        out.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False)
    else:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
        out.update(head_dim=cfg.head_dim, attention_bias=bool(cfg.qkv_bias), use_qk_norm=cfg.qk_norm == "head",
                   partial_rotary_factor=cfg.partial_rotary_factor)
    if arch.name == "deepseek_v2":
        out.update(topk_method="group_limited_greedy" if limited else "greedy", mlp_bias=False,
                   aux_loss_alpha=moe.aux_loss.switch)
    else:
        out["num_nextn_predict_layers"] = 0  # the export carries no multi-token prediction weights
    if arch.name == "deepseek_v3":
        out["topk_method"] = "noaux_tc"  # not read by transformers; vLLM and SGLang route by it
        out["rope_interleave"] = True  # the Hub's layout: tensors.py writes the rotary rows interleaved
    return out
