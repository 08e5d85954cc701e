"""Every tensor of a moe_dist model (ep_size 1 names) and the Hugging Face tensors it is made of,
for the architectures of arch.py: one `Mapping` per moe_dist tensor, with the HF names and
shapes (from the config, for checking a directory before reading it) and the transform each way.
`import-hf` runs them forward, `export-hf` backward; docs/checkpoints.md has the table.

The layouts (moe_dist `x @ W` weights are `[in, out]`, HF Linear weights `[out, in]`):
- attention: `attn.qkv.weight` rows = [q_proj; k_proj; v_proj] (head-major in both, and the same
  rotary pairing, so no row permutation), `.bias` likewise, `attn.out.weight` = o_proj;
- SwiGLU FFN: `w_in_DI` = [gate_proj^T | up_proj^T] (columns), `w_out_FD` = down_proj^T;
- experts stacked [E, ...] in expert order, each as a SwiGLU FFN. On disk HF has two layouts:
  "hub", one Linear per expert (`experts.e.{gate_proj,up_proj,down_proj}`, Mixtral `w1,w3,w2`
  under `block_sparse_moe`), what the Hub holds and what transformers 5's save_pretrained writes
  by default; and "fused", transformers 5's in-memory parameters (`mlp.experts.gate_up_proj`
  `[E, 2F, D]`, `down_proj` `[E, D, F]`), written by `save_pretrained(save_original_format=False)`.
  Import reads either; export writes "hub", which transformers 4 and 5 both load.
- router buffers that HF models do not have (the topk router's `selection_bias_E`) start at 0;
  DeepSeek-V3 / GLM-4.5's `mlp.gate.e_score_correction_bias` is that buffer (exported as zeros
  when `router.bias_balancing` is off, as the model then never reads it);
- latent attention (DeepSeek-V2/V3): q_proj or q_a_proj / q_a_layernorm / q_b_proj,
  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj map one to one onto `attn.q_proj` or
  `attn.q_down` / `q_norm` / `q_up`, `attn.kv_down`, `kv_norm`, `kv_up`, `out`, except that the
  rotary rows (each query head's last qk_rope_head_dim rows, kv_a_proj_with_mqa's last
  qk_rope_head_dim) are interleaved pairs in DeepSeek-V2 and in V3 with `rope_interleave`, and
  moe_dist's rotary is half-split: import reorders them evens-then-odds, export back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.checkpoint.hf.arch import Arch

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
    return Mapping(target, tuple(srcs), lambda xs: torch.cat(xs, dim=0),
                   lambda t: [p.contiguous() for p in t.split(sizes)])


def _swiglu(prefix: str, gate: HFTensor, up: HFTensor, down: HFTensor, w_in: str, w_out: str) -> list[Mapping]:
    F = gate.shape[0]
    return [Mapping(prefix + w_in, (gate, up), lambda xs: torch.cat([xs[0].t(), xs[1].t()], dim=1),
                    lambda t: [_t(t[:, :F]), _t(t[:, F:])]),
            Mapping(prefix + w_out, (down,), lambda xs: _t(xs[0]), lambda t: [_t(t)])]


def _hub_experts(prefix: str, gates: list[HFTensor], ups: list[HFTensor], downs: list[HFTensor]) -> list[Mapping]:
    E, F = len(gates), gates[0].shape[0]

    def w_in(xs: list[Tensor]) -> Tensor:
        return torch.stack([torch.cat([g.t(), u.t()], dim=1) for g, u in zip(xs[:E], xs[E:])])

    return [Mapping(prefix + "w_in_EDI", (*gates, *ups), w_in,
                    lambda t: [_t(t[e, :, :F]) for e in range(E)] + [_t(t[e, :, F:]) for e in range(E)]),
            Mapping(prefix + "w_out_EFD", tuple(downs), lambda xs: torch.stack([x.t() for x in xs]),
                    lambda t: [_t(t[e]) for e in range(E)])]


def _fused_experts(prefix: str, gate_up: HFTensor, down: HFTensor) -> list[Mapping]:
    def swap(xs: list[Tensor]) -> Tensor:
        return xs[0].transpose(1, 2).contiguous()

    return [Mapping(prefix + "w_in_EDI", (gate_up,), swap, lambda t: [t.transpose(1, 2).contiguous()]),
            Mapping(prefix + "w_out_EFD", (down,), swap, lambda t: [t.transpose(1, 2).contiguous()])]


def expert_names(arch: Arch, layer: int, layout: str) -> list[str]:
    """The names that tell a layer's expert layout (for detection and messages)."""
    p = f"model.layers.{layer}."
    if layout == FUSED:
        return [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"]
    return [f"{p}{arch.moe_block}.experts.0.{arch.expert_proj[0]}.weight"]


def _rope_order(width: int) -> Tensor:
    """Interleaved pairs (x0, x1), (x2, x3), ... -> half-split (x0, x2, ..., x1, x3, ...)."""
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def _rope_rows(target: str, src: HFTensor, blocks: int, nope: int, rope: int) -> Mapping:
    """A weight of `blocks` row blocks [nope rows; rope rows] whose rope rows are interleaved in HF."""
    order = torch.cat([torch.arange(nope), nope + _rope_order(rope)])
    inverse = torch.argsort(order)

    def permute(t: Tensor, o: Tensor) -> Tensor:
        return t.reshape(blocks, nope + rope, *t.shape[1:])[:, o].reshape(t.shape).contiguous()

    return Mapping(target, (src,), lambda xs: permute(xs[0], order), lambda t: [permute(t, inverse)])


def _interleaved(arch: Arch, config_rope_interleave: bool) -> bool:
    return arch.rope_layout == "interleaved" or (arch.rope_layout == "field" and config_rope_interleave)


class _Dims:
    """The sizes of one model, each with the config.json field (and value) it comes from, so an
    HF tensor's expected shape and the reason for it are written once: `dims.t(name, "HA", "D")`."""

    def __init__(self, arch: Arch, cfg) -> None:
        D, H, A = cfg.d_model, cfg.n_heads, cfg.head_dim
        Y = cfg.n_kv_heads
        self.size = {"V": cfg.vocab_size, "D": D, "D2": 2 * D, "HA": H * A, "YA": Y * A, "A": A, "F": cfg.d_ff,
                     "1": 1}
        self.field = {"V": f"vocab_size {cfg.vocab_size}", "D": f"hidden_size {D}", "D2": f"2 x hidden_size {D}",
                      "HA": f"num_attention_heads {H} x head_dim {A}", "YA": f"num_key_value_heads {Y} x head_dim {A}",
                      "A": f"head_dim {A}", "F": f"intermediate_size {cfg.d_ff}", "1": "1"}
        if cfg.moe is not None:
            moe, ne, ff = cfg.moe, arch.num_experts_key, arch.expert_ff_key
            self.size.update(E=moe.num_experts, Fe=moe.d_ff, Fe2=2 * moe.d_ff, S=moe.shared_d_ff)
            self.field.update(E=f"{ne} {moe.num_experts}", Fe=f"{ff} {moe.d_ff}", Fe2=f"2 x {ff} {moe.d_ff}",
                              S=f"shared_expert_intermediate_size {moe.shared_d_ff}")
            if arch.deepseek:
                self.field["S"] = f"{ff} {moe.d_ff} x n_shared_experts {moe.num_shared_experts}"
        if cfg.attention == "mla":
            n, r, o, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
            self.size.update(Hq=H * (n + r), Hkv=H * (n + o), Ho=H * o, cr=c + r, c=c, l=cfg.q_lora_rank or 0)
            self.field.update(Hq=f"num_attention_heads {H} x (qk_nope_head_dim {n} + qk_rope_head_dim {r})",
                              Hkv=f"num_attention_heads {H} x (qk_nope_head_dim {n} + v_head_dim {o})",
                              Ho=f"num_attention_heads {H} x v_head_dim {o}",
                              cr=f"kv_lora_rank {c} + qk_rope_head_dim {r}", c=f"kv_lora_rank {c}",
                              l=f"q_lora_rank {cfg.q_lora_rank}")

    def t(self, name: str, *dims: str) -> HFTensor:
        return HFTensor(name, tuple(self.size[d] for d in dims), ", ".join(self.field[d] for d in dims))


def _latent_attention(cfg, d: _Dims, att: str, dst: str, interleaved: bool) -> list[Mapping]:
    H, n, r, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

    def rope_rows(target: str, src: HFTensor, blocks: int, nope: int) -> Mapping:
        return _rope_rows(target, src, blocks, nope, r) if interleaved else _copy(target, src)

    if cfg.q_lora_rank is None:
        plan = [rope_rows(dst + "q_proj.weight", d.t(att + "q_proj.weight", "Hq", "D"), H, n)]
    else:
        plan = [_copy(dst + "q_down.weight", d.t(att + "q_a_proj.weight", "l", "D")),
                _copy(dst + "q_norm.weight", d.t(att + "q_a_layernorm.weight", "l")),
                rope_rows(dst + "q_up.weight", d.t(att + "q_b_proj.weight", "Hq", "l"), H, n)]
    return plan + [rope_rows(dst + "kv_down.weight", d.t(att + "kv_a_proj_with_mqa.weight", "cr", "D"), 1, c),
                   _copy(dst + "kv_norm.weight", d.t(att + "kv_a_layernorm.weight", "c")),
                   _copy(dst + "kv_up.weight", d.t(att + "kv_b_proj.weight", "Hkv", "c")),
                   _copy(dst + "out.weight", d.t(att + "o_proj.weight", "D", "Ho"))]


def tensor_plan(arch: Arch, cfg, layout: str = HUB, rope_interleave: bool = True,
                mtp_layout: str | None = None) -> list[Mapping]:
    """The moe_dist tensors of `cfg` (ep_size 1, buffers included) from the HF tensors of `arch`.
    `rope_interleave`: DeepSeek-V3's config.json field of that name (its rotary rows' layout).
    With `cfg.mtp_layers`, the MTP block too (DeepSeek-V3's layer n_layers, experts in
    `mtp_layout`, default `layout`); its copies of the embedding and head are `mtp_shared_copies`."""
    d = _Dims(arch, cfg)
    interleaved = _interleaved(arch, rope_interleave)
    plan = [_copy("embed.weight", d.t("model.embed_tokens.weight", "V", "D"))]
    for i in range(cfg.n_layers):
        plan += _layer(arch, cfg, d, i, layout, interleaved)
    plan.append(_copy("norm.weight_D", d.t("model.norm.weight", "D")))
    if not cfg.tie_embeddings:
        plan.append(_copy("lm_head.weight", d.t("lm_head.weight", "V", "D")))
    if cfg.mtp_layers:
        src, dst = f"model.layers.{cfg.n_layers}.", f"blocks.{cfg.n_layers}."
        plan += _layer(arch, cfg, d, cfg.n_layers, mtp_layout or layout, interleaved)
        plan += [_copy(dst + "enorm.weight_D", d.t(src + "enorm.weight", "D")),
                 _copy(dst + "hnorm.weight_D", d.t(src + "hnorm.weight", "D")),
                 _copy(dst + "eh_proj.weight", d.t(src + "eh_proj.weight", "D", "D2")),  # [embedding | hidden]
                 _copy(dst + "head_norm.weight_D", d.t(src + "shared_head.norm.weight", "D"))]
    return plan


def mtp_shared_copies(arch: Arch, cfg) -> dict[str, HFTensor]:
    """DeepSeek-V3's MTP layer stores its own copies of the embedding and the output head, which
    moe_dist shares with the main model: copy name -> the main model's tensor it must equal."""
    d, p = _Dims(arch, cfg), f"model.layers.{cfg.n_layers}."
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return {p + "embed_tokens.weight": d.t("model.embed_tokens.weight", "V", "D"),
            p + "shared_head.head.weight": d.t(head, "V", "D")}


def _layer(arch: Arch, cfg, d: _Dims, i: int, layout: str, interleaved: bool) -> list[Mapping]:
    src, dst = f"model.layers.{i}.", f"blocks.{i}."
    att = src + "self_attn."
    plan = [_copy(dst + "attn_norm.weight_D", d.t(src + "input_layernorm.weight", "D"))]
    if cfg.attention == "mla":
        plan += _latent_attention(cfg, d, att, dst + "attn.", interleaved)
        plan.append(_copy(dst + "ffn_norm.weight_D", d.t(src + "post_attention_layernorm.weight", "D")))
        return plan + (_moe_layer(arch, cfg, d, i, layout) if cfg.is_moe_layer(i) else _dense_ffn(d, src, dst))
    plan += [_rows(dst + "attn.qkv.weight", [d.t(att + "q_proj.weight", "HA", "D"),
                                             d.t(att + "k_proj.weight", "YA", "D"),
                                             d.t(att + "v_proj.weight", "YA", "D")])]
    if cfg.qkv_bias:
        plan.append(_rows(dst + "attn.qkv.bias", [d.t(att + "q_proj.bias", "HA"), d.t(att + "k_proj.bias", "YA"),
                                                  d.t(att + "v_proj.bias", "YA")]))
    if cfg.qk_norm != "none":
        head = cfg.qk_norm == "head"
        plan += [_copy(dst + "attn.q_norm.weight", d.t(att + "q_norm.weight", "A" if head else "HA")),
                 _copy(dst + "attn.k_norm.weight", d.t(att + "k_norm.weight", "A" if head else "YA"))]
    plan += [_copy(dst + "attn.out.weight", d.t(att + "o_proj.weight", "D", "HA")),
             _copy(dst + "ffn_norm.weight_D", d.t(src + "post_attention_layernorm.weight", "D"))]
    return plan + (_moe_layer(arch, cfg, d, i, layout) if cfg.is_moe_layer(i) else _dense_ffn(d, src, dst))


def _dense_ffn(d: _Dims, src: str, dst: str) -> list[Mapping]:
    mlp = src + "mlp."
    return _swiglu(dst + "ffn.", d.t(mlp + "gate_proj.weight", "F", "D"), d.t(mlp + "up_proj.weight", "F", "D"),
                   d.t(mlp + "down_proj.weight", "D", "F"), "w_in_DI", "w_out_FD")


def _moe_layer(arch: Arch, cfg, d: _Dims, i: int, layout: str) -> list[Mapping]:
    moe = cfg.moe
    E = moe.num_experts
    dst = f"blocks.{i}.moe."
    block = f"model.layers.{i}.{arch.moe_block if layout == HUB else 'mlp'}."
    plan = [_copy(dst + "router.gate.weight_ED", d.t(block + "gate.weight", "E", "D"))]
    if arch.router_bias:
        used = getattr(moe.router, "bias_balancing", False)
        plan.append(Mapping(dst + "router.selection_bias_E", (d.t(block + "gate.e_score_correction_bias", "E"),),
                            lambda xs: xs[0], lambda t: [t if used else torch.zeros_like(t)]))
    else:
        plan.append(Mapping(dst + "router.selection_bias_E", (), lambda xs: torch.zeros(E), lambda t: []))
    ex = block + "experts."
    if layout == FUSED:
        plan += _fused_experts(dst + "experts.", d.t(ex + "gate_up_proj", "E", "Fe2", "D"),
                               d.t(ex + "down_proj", "E", "D", "Fe"))
    else:
        g, u, dn = arch.expert_proj
        plan += _hub_experts(dst + "experts.", [d.t(f"{ex}{e}.{g}.weight", "Fe", "D") for e in range(E)],
                             [d.t(f"{ex}{e}.{u}.weight", "Fe", "D") for e in range(E)],
                             [d.t(f"{ex}{e}.{dn}.weight", "D", "Fe") for e in range(E)])
    if moe.num_shared_experts:
        sh = block + ("shared_experts." if arch.deepseek else "shared_expert.")
        plan += _swiglu(dst + "shared.", d.t(sh + "gate_proj.weight", "S", "D"), d.t(sh + "up_proj.weight", "S", "D"),
                        d.t(sh + "down_proj.weight", "D", "S"), "w_in_DI", "w_out_FD")
    if moe.shared_gate:
        plan.append(_copy(dst + "shared_gate.weight", d.t(block + "shared_expert_gate.weight", "1", "D")))
    return plan
