"""A moe_dist MoE language model for Hugging Face transformers (inference and fine-tuning).

Written by moe_dist's `export-hf` for architectures Mixtral cannot express (research routers,
dense layers between MoE layers, shared experts, GELU experts, unrenormalized top-k, selection
bias). Self-contained: torch and transformers only. Tensor names and math mirror moe_dist's
`MoETransformer` at ep_size 1 in eval mode, so the exported weights load one to one:

- pre-norm blocks: x + attn(rmsnorm(x)); x + ffn(rmsnorm(x)), the FFN dense or MoE;
- RMSNorm and rotary embeddings (half-split layout) computed in fp32; causal SDPA attention;
- router scores in fp32; routers in their eval form: `topk` (softmax, optional selection bias,
  optional renormalization), `inhibition` (EMA population statistics with bias correction),
  `fixed_projection` (frozen projection, optional centering and COMET routing stream),
  `attentive` (gate trunk, query, per-expert key probes);
- dropless: every token reaches its top-k experts (moe_dist's eval default; a capacity set with
  moe.eval_capacity_factor > 0 would drop, and the two agree when it drops nothing);
- `attention_mask` (left or right padding), a KV cache through transformers' `Cache` (`generate`
  creates a `DynamicCache`), and positions from the mask (a left-padded prompt's first real
  token is position 0, as alone); rotary angles are computed for any position, so sequences may
  run past max_seq_len as RoPE models do (quality there is whatever the model learned).

Every eval-form router and expert computes each token on its own: padding changes no real token.

Legend: B batch, S sequence (new tokens), P positions in the cache (past + new), D model width,
T = B*S tokens, E experts, K experts per token, F FFN hidden width, H gate width, R shared
directions (or rotary frequencies in the attention).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # very old transformers: generation recomputes (use_cache=False)
    DynamicCache = None

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

from .configuration_moe_dist import MoEDistConfig

GATE_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def rotary_tables(positions_BS, head_dim, theta):
    """fp32 cos/sin [B, 1, S, head_dim / 2] at each token's position."""
    device = positions_BS.device
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_BSR = positions_BS.float()[..., None] * inv_freq_R
    return angles_BSR.cos()[:, None], angles_BSR.sin()[:, None]


def token_positions(attention_mask_BP, past_len, seq_len, device):
    """Each new token's position: the count of real tokens before it (so left padding does not
    shift a prompt), or past_len + i without a mask."""
    if attention_mask_BP is None:
        return (past_len + torch.arange(seq_len, device=device))[None]
    positions_BP = attention_mask_BP.long().cumsum(-1) - 1
    return positions_BP.clamp_min(0)[:, -seq_len:]


def attention_bias(attention_mask_BP, past_len, seq_len, device):
    """Boolean [B, 1, S, P] (True: may attend): causal over the cache and the new tokens, padding
    keys masked. Each query may always see itself, so a padding query's row is never empty."""
    P = past_len + seq_len
    q_S1 = past_len + torch.arange(seq_len, device=device)[:, None]
    k_1P = torch.arange(P, device=device)[None]
    allowed_SP = k_1P <= q_S1
    if attention_mask_BP is None:
        return allowed_SP[None, None]
    keys_BP = attention_mask_BP[:, -P:].bool()
    return ((allowed_SP[None] & keys_BP[:, None]) | (k_1P == q_S1)[None])[:, None]


def apply_rotary(x, cos_SF, sin_SF):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF], dim=-1).to(x.dtype)


def ffn_activation(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class RMSNorm(nn.Module):
    def __init__(self, d_model, eps):
        super().__init__()
        self.eps = eps
        self.weight_D = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight_D.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model, n_heads, layer_idx):
        super().__init__()
        self.n_heads, self.layer_idx = n_heads, layer_idx
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD, cos, sin, bias, cache):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # k, v become [B, H, P, A]: the cached positions, then these
            k, v = cache.update(k, v, self.layer_idx)
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, d_model, d_ff, activation):
        super().__init__()
        self.activation = activation
        self.w_in_DF = nn.Parameter(torch.empty(d_model, 2 * d_ff if activation == "swiglu" else d_ff))
        self.w_out_FD = nn.Parameter(torch.empty(d_ff, d_model))

    def forward(self, x):
        return ffn_activation(x @ self.w_in_DF.to(x.dtype), self.activation) @ self.w_out_FD.to(x.dtype)


class Experts(nn.Module):
    """E FFN experts in stacked tensors; every token's K chosen experts, weighted and summed."""

    def __init__(self, num_experts, d_model, d_ff, activation):
        super().__init__()
        self.activation = activation
        in_width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_eDF = nn.Parameter(torch.empty(num_experts, d_model, in_width))
        self.w_out_eFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))

    def forward(self, x_TD, idx_TK, w_TK):
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.w_in_eDF.shape[0]):
            token_N, k_N = (idx_TK == e).nonzero(as_tuple=True)
            if token_N.numel() == 0:
                continue
            h = ffn_activation(x_TD[token_N] @ self.w_in_eDF[e].to(x_TD.dtype), self.activation)
            out_ND = h @ self.w_out_eFD[e].to(x_TD.dtype)
            y_TD.index_add_(0, token_N, out_ND * w_TK[token_N, k_N].to(out_ND.dtype)[:, None])
        return y_TD


def topk_from_logits(logits_TE, top_k, renormalize, selection_bias_E=None):
    probs_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = probs_TE if selection_bias_E is None else probs_TE + selection_bias_E
    idx_TK = torch.topk(select_TE, top_k, dim=-1).indices
    w_TK = probs_TE.gather(1, idx_TK)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return idx_TK, w_TK


class PopulationStatistics(nn.Module):
    """The inhibition statistics' EMA buffers and their bias-corrected values (eval form)."""

    def __init__(self, width, mode, momentum, rank):
        super().__init__()
        self.mode, self.momentum = mode, momentum
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if mode == "subspace":
            self.register_buffer("ema_second_DD", torch.zeros(width, width))
            self.register_buffer("basis_DR", torch.zeros(width, rank))
        else:
            self.register_buffer("ema_mean_D", torch.zeros(width))
            if mode == "divisive":
                self.register_buffer("ema_var_D", torch.zeros(width))

    def _corrected(self, name, default):
        t = self.num_updates
        value = getattr(self, f"ema_{name}") / (1.0 - self.momentum ** t.float()).clamp_min(1e-12)
        return torch.where(t > 0, value, torch.full_like(value, default))

    def inhibit(self, x_TD, alpha, eps):
        x = x_TD.float()
        if self.mode == "subspace":
            return x - (x @ self.basis_DR) @ self.basis_DR.t()
        mean_D = self._corrected("mean_D", 0.0)
        if self.mode == "subtractive":
            return x - alpha * mean_D
        if self.mode == "rectified":
            return F.relu(x - alpha * mean_D)
        return (x - mean_D) * torch.rsqrt(self._corrected("var_D", 1.0) + eps)


class LinearGate(nn.Module):
    def __init__(self, d_model, num_experts):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TD):
        return F.linear(x_TD.float(), self.weight_ED.float())


class TopKRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k = r, top_k
        self.gate = LinearGate(d_model, num_experts)
        self.register_buffer("selection_bias_E", torch.zeros(num_experts))

    def route(self, x_TD):
        bias = self.selection_bias_E if self.r.get("bias_balancing", False) else None
        return topk_from_logits(self.gate(x_TD), self.top_k, self.r.get("renormalize", False), bias)

    def forward(self, x_TD, stream_TD):
        idx_TK, w_TK = self.route(x_TD)
        return idx_TK, w_TK, stream_TD


class InhibitionRouter(TopKRouter):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__(r, d_model, num_experts, top_k)
        self.inhibition = PopulationStatistics(d_model, r.get("mode", "subtractive"), r.get("momentum", 0.99),
                                               r.get("rank", 1))

    def forward(self, x_TD, stream_TD):
        u_TD = self.inhibition.inhibit(x_TD, self.r.get("alpha", 1.0), self.r.get("eps", 1e-5))
        idx_TK, w_TK = self.route(u_TD)
        return idx_TK, w_TK, stream_TD


class FixedProjectionRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k, self.num_experts, self.d_model = r, top_k, num_experts, d_model
        self.from_stream = r.get("source", "hidden") == "embedding"
        self.register_buffer("v_projection", torch.zeros(d_model if self.from_stream else num_experts, d_model))
        self.stream_k = max(1, round(r.get("stream_active_fraction", 0.5) * d_model))
        self.center = (PopulationStatistics(d_model, "subtractive", r.get("center_momentum", 0.99), 1)
                       if r.get("center", False) else None)
        self.register_buffer("selection_bias_E", torch.zeros(num_experts))

    def forward(self, x_TD, stream_TD):
        u_TD = stream_TD.reshape(-1, self.d_model).detach().float() if self.from_stream else x_TD.float()
        if self.center is not None:
            u_TD = self.center.inhibit(u_TD, 1.0, 1e-5)
        if self.from_stream:
            c_TD = u_TD @ self.v_projection.t()
            winners = torch.topk(c_TD, self.stream_k, dim=-1).indices
            stream_TD = torch.zeros_like(c_TD).scatter_(-1, winners, 1.0) * c_TD
            scores_TE = stream_TD.view(-1, self.num_experts, self.d_model // self.num_experts).sum(-1)
        else:
            scores_TE = u_TD @ self.v_projection.t()
        select_TE = scores_TE + self.selection_bias_E if self.r.get("bias_balancing", False) else scores_TE
        idx_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
        chosen_TK = scores_TE.gather(1, idx_TK)
        if self.r.get("weights", "uniform") == "softmax":
            w_TK = torch.softmax(chosen_TK, dim=-1)
        else:
            w_TK = torch.ones_like(chosen_TK)
        return idx_TK, w_TK, stream_TD


class AttentiveRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k = r, top_k
        hidden = r.get("hidden", 32)
        self.act = GATE_ACTIVATIONS[r.get("activation", "relu")]
        self.gate_trunk = nn.Linear(d_model, hidden)
        self.w_q = nn.Linear(hidden, hidden, bias=False)
        self.w_k = nn.Linear(hidden, hidden, bias=False)
        self.probes_EHD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x_TD, stream_TD):
        x = x_TD.float()
        q_TH = F.linear(self.act(F.linear(x, self.gate_trunk.weight.float(), self.gate_trunk.bias.float())),
                        self.w_q.weight.float())
        probe_TEH = self.act(torch.einsum("td,ehd->teh", x, self.probes_EHD.float()))
        k_TEH = F.linear(probe_TEH, self.w_k.weight.float())
        scores_TE = torch.einsum("th,teh->te", q_TH, k_TEH) / math.sqrt(q_TH.shape[-1])
        idx_TK, w_TK = topk_from_logits(scores_TE, self.top_k, self.r.get("renormalize", False))
        return idx_TK, w_TK, stream_TD


ROUTERS = {"topk": TopKRouter, "inhibition": InhibitionRouter, "fixed_projection": FixedProjectionRouter,
           "attentive": AttentiveRouter}


class MoELayer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.d_model = m["d_model"]
        router = m["router"]
        if router["type"] not in ROUTERS:
            raise ValueError(f"router type {router['type']!r} is not one of {sorted(ROUTERS)}")
        self.router = ROUTERS[router["type"]](router, m["d_model"], m["num_experts"], m["top_k"])
        self.experts = Experts(m["num_experts"], m["d_model"], m["d_ff"], m["activation"])
        self.shared = (DenseFFN(m["d_model"], m["d_ff"] * m["num_shared_experts"], m["activation"])
                       if m.get("num_shared_experts", 0) else None)

    def forward(self, x, stream_TD):
        x_TD = x.reshape(-1, self.d_model)
        idx_TK, w_TK, stream_TD = self.router(x_TD, stream_TD)
        y_TD = self.experts(x_TD, idx_TK, w_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(x.shape), stream_TD


class Block(nn.Module):
    def __init__(self, c, m, is_moe, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.attn = Attention(c["d_model"], c["n_heads"], layer_idx)
        self.ffn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.moe = MoELayer(m) if is_moe else None
        self.ffn = None if is_moe else DenseFFN(c["d_model"], c["d_ff"], c["activation"])

    def forward(self, x, cos, sin, bias, cache, stream_TD):
        x = x + self.attn(self.attn_norm(x), cos, sin, bias, cache)
        if self.moe is None:
            return x + self.ffn(self.ffn_norm(x)), stream_TD
        y, stream_TD = self.moe(self.ffn_norm(x), stream_TD)
        return x + y, stream_TD


def is_moe_layer(c, m, i):
    every, offset = c.get("moe_every", 1), c.get("moe_offset", 0)
    return m is not None and every > 0 and i >= offset and (i - offset) % every == 0


class MoEDistModel(nn.Module):
    """moe_dist's MoETransformer (same tensor names)."""

    def __init__(self, config):
        super().__init__()
        c, m = config.moe_dist_model, config.moe_dist_moe
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["d_model"])
        self.blocks = nn.ModuleList(Block(c, m, is_moe_layer(c, m, i), i) for i in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.lm_head = None if c["tie_embeddings"] else nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, tokens_BS, attention_mask_BP=None, cache=None, positions_BS=None):
        B, S = tokens_BS.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = tokens_BS.device
        if positions_BS is None:
            positions_BS = token_positions(attention_mask_BP, past, S, device)
        cos, sin = rotary_tables(positions_BS, self.c["d_model"] // self.c["n_heads"], self.c["rope_theta"])
        # Without padding and cache the causal kernel needs no mask (the training-time path).
        plain = past == 0 and (attention_mask_BP is None or bool(attention_mask_BP.all()))
        bias = None if plain else attention_bias(attention_mask_BP, past, S, device)
        x = self.embed(tokens_BS)
        stream_TD = x.detach().reshape(B * S, -1)
        for block in self.blocks:
            x, stream_TD = block(x, cos, sin, bias, cache, stream_TD)
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return self.norm(x) @ weight_VD.t()


class MoEDistForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoEDistConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def __init__(self, config):
        super().__init__(config)
        self.model = MoEDistModel(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.moe_dist_model.get("init_std", 0.02)
        for name, p in module.named_parameters(recurse=False):
            if name == "weight_D":
                nn.init.ones_(p)
            elif name == "bias":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids=None, attention_mask=None, labels=None, cache=None, past_key_values=None,
                position_ids=None, use_cache=None, **kwargs):
        # transformers 5 names the cache `cache`, transformers 4 `past_key_values`.
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None and DynamicCache is not None:
            cache = DynamicCache()
        logits = self.model(input_ids, attention_mask, cache, position_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
