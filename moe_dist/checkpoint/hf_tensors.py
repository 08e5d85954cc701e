"""Every tensor of a moe_dist model (ep_size 1 names) and the Hugging Face tensors it is made of,
for the architectures of hf_arch.py: one `Mapping` per moe_dist tensor, with the HF names and
shapes (from the config, for checking a directory before reading it) and the transform each way.
`import-hf` runs them forward, `export-hf` backward; docs/checkpoints.md has the table.

The layouts (moe_dist `x @ W` weights are `[in, out]`, HF Linear weights `[out, in]`):
- attention: `attn.qkv.weight` rows = [q_proj; k_proj; v_proj] (head-major in both, and the same
  rotary pairing, so no row permutation), `.bias` likewise, `attn.out.weight` = o_proj;
- SwiGLU FFN: `w_in_DF` = [gate_proj^T | up_proj^T] (columns), `w_out_FD` = down_proj^T;
- experts stacked [E, ...] in expert order, each as a SwiGLU FFN. On disk HF has two layouts:
  "hub", one Linear per expert (`experts.e.{gate_proj,up_proj,down_proj}`, Mixtral `w1,w3,w2`
  under `block_sparse_moe`), what the Hub holds and what transformers 5's save_pretrained writes
  by default; and "fused", transformers 5's in-memory parameters (`mlp.experts.gate_up_proj`
  `[E, 2F, D]`, `down_proj` `[E, D, F]`), written by `save_pretrained(save_original_format=False)`.
  Import reads either; export writes "hub", which transformers 4 and 5 both load.
- router buffers that HF models do not have (the topk router's `selection_bias_E`) start at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.checkpoint.hf_arch import Arch, shared_width

HUB, FUSED = "hub", "fused"
# Non-persistent buffers older transformers saved; they are recomputed, so never read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    fields: str  # the config.json fields the shape follows from, for error messages


@dataclass(frozen=True)
class Mapping:
    target: str  # the moe_dist tensor
    sources: tuple[HFTensor, ...]
    to_moe_dist: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _t(x: Tensor) -> Tensor:
    return x.t().contiguous()


def _copy(target: str, src: HFTensor) -> Mapping:
    return Mapping(target, (src,), lambda xs: xs[0], lambda t: [t])


def _rows(target: str, srcs: list[HFTensor]) -> Mapping:
    sizes = [s.shape[0] for s in srcs]
    return Mapping(target, tuple(srcs), lambda xs: torch.cat(xs, dim=0), lambda t: [p.contiguous() for p in t.split(sizes)])


def _swiglu(prefix: str, gate: HFTensor, up: HFTensor, down: HFTensor, w_in: str, w_out: str) -> list[Mapping]:
    F = gate.shape[0]
    return [Mapping(prefix + w_in, (gate, up), lambda xs: torch.cat([xs[0].t(), xs[1].t()], dim=1),
                    lambda t: [_t(t[:, :F]), _t(t[:, F:])]),
            Mapping(prefix + w_out, (down,), lambda xs: _t(xs[0]), lambda t: [_t(t)])]


def _hub_experts(prefix: str, gates: list[HFTensor], ups: list[HFTensor], downs: list[HFTensor]) -> list[Mapping]:
    E, F = len(gates), gates[0].shape[0]

    def w_in(xs: list[Tensor]) -> Tensor:
        return torch.stack([torch.cat([g.t(), u.t()], dim=1) for g, u in zip(xs[:E], xs[E:])])

    return [Mapping(prefix + "w_in_eDF", (*gates, *ups), w_in,
                    lambda t: [_t(t[e, :, :F]) for e in range(E)] + [_t(t[e, :, F:]) for e in range(E)]),
            Mapping(prefix + "w_out_eFD", tuple(downs), lambda xs: torch.stack([x.t() for x in xs]),
                    lambda t: [_t(t[e]) for e in range(E)])]


def _fused_experts(prefix: str, gate_up: HFTensor, down: HFTensor) -> list[Mapping]:
    def swap(xs: list[Tensor]) -> Tensor:
        return xs[0].transpose(1, 2).contiguous()

    return [Mapping(prefix + "w_in_eDF", (gate_up,), swap, lambda t: [t.transpose(1, 2).contiguous()]),
            Mapping(prefix + "w_out_eFD", (down,), swap, lambda t: [t.transpose(1, 2).contiguous()])]


def expert_names(arch: Arch, layer: int, layout: str) -> list[str]:
    """The names that tell a layer's expert layout (for detection and messages)."""
    p = f"model.layers.{layer}."
    if layout == FUSED:
        return [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"]
    return [f"{p}{arch.moe_block}.experts.0.{arch.expert_proj[0]}.weight"]


def tensor_plan(arch: Arch, cfg, layout: str = HUB) -> list[Mapping]:
    """The moe_dist tensors of `cfg` (ep_size 1, buffers included) from the HF tensors of `arch`."""
    D, V, H, Y, A = cfg.d_model, cfg.vocab_size, cfg.n_heads, getattr(cfg, 'n_kv_heads', None) or cfg.n_heads, cfg.head_dim
    hd = "num_attention_heads x head_dim, hidden_size"
    kvd = "num_key_value_heads x head_dim, hidden_size"
    plan = [_copy("embed.weight", HFTensor("model.embed_tokens.weight", (V, D), "vocab_size, hidden_size"))]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        att = src + "self_attn."
        plan += [
            _copy(dst + "attn_norm.weight_D", HFTensor(src + "input_layernorm.weight", (D,), "hidden_size")),
            _rows(dst + "attn.qkv.weight", [HFTensor(att + "q_proj.weight", (H * A, D), hd),
                                            HFTensor(att + "k_proj.weight", (Y * A, D), kvd),
                                            HFTensor(att + "v_proj.weight", (Y * A, D), kvd)]),
        ]
        if getattr(cfg, 'qkv_bias', False):
            plan.append(_rows(dst + "attn.qkv.bias", [HFTensor(att + "q_proj.bias", (H * A,), "num_attention_heads x head_dim"),
                                                      HFTensor(att + "k_proj.bias", (Y * A,), "num_key_value_heads x head_dim"),
                                                      HFTensor(att + "v_proj.bias", (Y * A,), "num_key_value_heads x head_dim")]))
        if getattr(cfg, 'qk_norm', 'none') != "none":
            head = cfg.qk_norm == "head"
            plan += [_copy(dst + "attn.q_norm.weight", HFTensor(att + "q_norm.weight", (A,) if head else (H * A,),
                                                                "head_dim" if head else "hidden_size")),
                     _copy(dst + "attn.k_norm.weight", HFTensor(att + "k_norm.weight", (A,) if head else (Y * A,),
                                                                "head_dim" if head else "num_key_value_heads x head_dim"))]
        plan += [
            _copy(dst + "attn.out.weight", HFTensor(att + "o_proj.weight", (D, H * A), "hidden_size, " + hd.split(",")[0])),
            _copy(dst + "ffn_norm.weight_D", HFTensor(src + "post_attention_layernorm.weight", (D,), "hidden_size")),
        ]
        if cfg.is_moe_layer(i):
            plan += _moe_layer(arch, cfg, i, layout)
        else:
            F, ff = cfg.d_ff, "intermediate_size, hidden_size"
            mlp = src + "mlp."
            plan += _swiglu(dst + "ffn.", HFTensor(mlp + "gate_proj.weight", (F, D), ff),
                            HFTensor(mlp + "up_proj.weight", (F, D), ff),
                            HFTensor(mlp + "down_proj.weight", (D, F), "hidden_size, intermediate_size"),
                            "w_in_DF", "w_out_FD")
    plan.append(_copy("norm.weight_D", HFTensor("model.norm.weight", (D,), "hidden_size")))
    if not cfg.tie_embeddings:
        plan.append(_copy("lm_head.weight", HFTensor("lm_head.weight", (V, D), "vocab_size, hidden_size")))
    return plan


def _moe_layer(arch: Arch, cfg, i: int, layout: str) -> list[Mapping]:
    moe, D = cfg.moe, cfg.d_model
    E, F = moe.num_experts, moe.d_ff
    ne, ff = arch.num_experts_key, arch.expert_ff_key
    dst = f"blocks.{i}.moe."
    block = f"model.layers.{i}.{arch.moe_block if layout == HUB else 'mlp'}."
    E_bias = E
    plan = [_copy(dst + "router.gate.weight_ED", HFTensor(block + "gate.weight", (E, D), f"{ne}, hidden_size")),
            Mapping(dst + "router.selection_bias_E", (), lambda xs: torch.zeros(E_bias), lambda t: [])]
    if layout == FUSED:
        plan += _fused_experts(dst + "experts.", HFTensor(block + "experts.gate_up_proj", (E, 2 * F, D),
                                                          f"{ne}, 2 x {ff}, hidden_size"),
                               HFTensor(block + "experts.down_proj", (E, D, F), f"{ne}, hidden_size, {ff}"))
    else:
        g, u, d = arch.expert_proj
        ex = block + "experts."
        plan += _hub_experts(dst + "experts.",
                             [HFTensor(f"{ex}{e}.{g}.weight", (F, D), f"{ff}, hidden_size") for e in range(E)],
                             [HFTensor(f"{ex}{e}.{u}.weight", (F, D), f"{ff}, hidden_size") for e in range(E)],
                             [HFTensor(f"{ex}{e}.{d}.weight", (D, F), f"hidden_size, {ff}") for e in range(E)])
    if moe.num_shared_experts:
        S, sf = shared_width(moe), "shared_expert_intermediate_size, hidden_size"
        sh = block + "shared_expert."
        plan += _swiglu(dst + "shared.", HFTensor(sh + "gate_proj.weight", (S, D), sf),
                        HFTensor(sh + "up_proj.weight", (S, D), sf),
                        HFTensor(sh + "down_proj.weight", (D, S), "hidden_size, shared_expert_intermediate_size"),
                        "w_in_DF", "w_out_FD")
    if getattr(moe, 'shared_gate', False):
        plan.append(_copy(dst + "shared_gate.weight", HFTensor(block + "shared_expert_gate.weight", (1, D),
                                                               "hidden_size")))
    return plan
