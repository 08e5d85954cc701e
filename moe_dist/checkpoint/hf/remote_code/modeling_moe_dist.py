"""A moe_dist MoE language model for Hugging Face transformers (inference and fine-tuning).

Written by moe_dist's `export-hf` for models no native transformers class expresses (research
routers, dense layers between MoE layers, shared experts, GELU experts, unrenormalized or sigmoid
top-k, selection bias, and any attention moe_dist has beside them). Self-contained: torch and
transformers only, plus its own files (`moe_dist_attention.py`, `moe_dist_routers.py`). Tensor
names and math mirror moe_dist's `MoETransformer` at ep_size 1 in eval mode, so the exported
weights load one to one:

- pre-norm blocks: x + attn(rmsnorm(x)); x + ffn(rmsnorm(x)), the FFN dense or MoE;
- attention (moe_dist_attention.py): multi-head or grouped-query, any head width, optional
  q/k/v bias and q/k RMSNorm; rotary in fp32; causal SDPA;
- routers in their eval form (moe_dist_routers.py), scores in fp32; the first `hash_layers` MoE
  layers route by `hash_router` (a token-id table), the later ones by `router`;
- MoE FFN: the routed experts, optionally with COMET's k-WTA mask on their hidden units, plus
  an optional shared expert of width `shared_d_ff`, optionally scaled by a sigmoid gate
  (Qwen2-MoE);
- dropless: every token reaches its top-k experts (moe_dist's eval default; a capacity set with
  moe.eval_capacity_factor > 0 would drop, and the two agree when it drops nothing);
- `attention_mask` (left or right padding), a KV cache through transformers' `Cache` (`generate`
  creates a `DynamicCache`), and positions from the mask (a left-padded prompt's first real
  token is position 0, as alone); rotary angles are computed for any position, so sequences may
  run past max_seq_len as RoPE models do (quality there is whatever the model learned).

Every eval-form router and expert computes each token on its own: padding changes no real token.

Legend (moe_dist's letters): B batch, S sequence (new tokens), W key positions (the cache's past
positions + the new ones), D model width, T = B*S tokens, E experts, K experts per token, F FFN
hidden width, I width of the FFN's first projection (2F with SwiGLU's gate and up fused, else F).
"""

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
from .moe_dist_attention import Attention, QKNorm, RMSNorm, attention_bias, rotary_tables, token_positions
from .moe_dist_routers import ROUTERS


def ffn_activation(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class DenseFFN(nn.Module):
    def __init__(self, d_model, d_ff, activation):
        super().__init__()
        self.activation = activation
        self.w_in_DI = nn.Parameter(torch.empty(d_model, 2 * d_ff if activation == "swiglu" else d_ff))
        self.w_out_FD = nn.Parameter(torch.empty(d_ff, d_model))

    def forward(self, x):
        return ffn_activation(x @ self.w_in_DI.to(x.dtype), self.activation) @ self.w_out_FD.to(x.dtype)


class ExpertMask(nn.Module):
    """COMET's mask inside experts (moe.comet_active_fraction): expert e keeps the k hidden units
    of kwta_k(u V_e) for its input u, exactly k winners (ties broken by topk, as in moe_dist).
    moe_dist draws V_eDF from its model seed and keeps it out of its state dict; the export
    writes it, so here it is a persistent buffer (fp32, the matrix moe_dist scores with)."""

    def __init__(self, num_experts, d_model, d_ff, active_fraction):
        super().__init__()
        self.k = max(1, round(active_fraction * d_ff))
        self.register_buffer("v_EDF", torch.zeros(num_experts, d_model, d_ff, dtype=torch.float32))

    def forward(self, a_NF, u_ND, e):
        # fp32 scores whatever the model dtype: a rounded score can change the winners.
        scores_NF = u_ND.float() @ self.v_EDF[e].float()
        winners_NK = torch.topk(scores_NF, self.k, dim=-1).indices
        return a_NF * torch.zeros_like(scores_NF).scatter_(-1, winners_NK, 1.0).to(a_NF.dtype)


class Experts(nn.Module):
    """E FFN experts in stacked tensors; every token's K chosen experts, weighted and summed."""

    def __init__(self, num_experts, d_model, d_ff, activation, comet_active_fraction=None):
        super().__init__()
        self.activation = activation
        in_width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_EDI = nn.Parameter(torch.empty(num_experts, d_model, in_width))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.hidden_mask = (None if comet_active_fraction is None
                            else ExpertMask(num_experts, d_model, d_ff, comet_active_fraction))

    def forward(self, x_TD, idx_TK, w_TK):
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.w_in_EDI.shape[0]):
            token_N, k_N = (idx_TK == e).nonzero(as_tuple=True)
            if token_N.numel() == 0:
                continue
            x_ND = x_TD[token_N]
            a_NF = ffn_activation(x_ND @ self.w_in_EDI[e].to(x_TD.dtype), self.activation)
            if self.hidden_mask is not None:  # after the activation, on the SwiGLU product alike
                a_NF = self.hidden_mask(a_NF, x_ND, e)
            out_ND = a_NF @ self.w_out_EFD[e].to(x_TD.dtype)
            y_TD.index_add_(0, token_N, out_ND * w_TK[token_N, k_N].to(out_ND.dtype)[:, None])
        return y_TD


class MoELayer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.d_model = m["d_model"]
        router = m["router"]
        if router["type"] not in ROUTERS:
            raise ValueError(f"router type {router['type']!r} is not one of {sorted(ROUTERS)}")
        self.router = ROUTERS[router["type"]](router, m["d_model"], m["num_experts"], m["top_k"])
        self.experts = Experts(m["num_experts"], m["d_model"], m["d_ff"], m["activation"],
                               m.get("comet_active_fraction"))
        self.shared = (DenseFFN(m["d_model"], m["shared_d_ff"], m["activation"])
                       if m["num_shared_experts"] else None)
        self.shared_gate = nn.Linear(m["d_model"], 1, bias=False) if m["shared_gate"] else None

    def forward(self, x, stream_TD, token_ids_T):
        x_TD = x.reshape(-1, self.d_model)
        if getattr(self.router, "reads_token_ids", False):
            idx_TK, w_TK, stream_TD = self.router(x_TD, stream_TD, token_ids_T)
        else:
            idx_TK, w_TK, stream_TD = self.router(x_TD, stream_TD)
        y_TD = self.experts(x_TD, idx_TK, w_TK)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:  # model dtype, not fp32: moe_dist's gate is a plain Linear
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.view(x.shape), stream_TD


class Block(nn.Module):
    def __init__(self, c, m, is_moe, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.attn = Attention(c, layer_idx)
        self.ffn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.moe = MoELayer(m) if is_moe else None
        self.ffn = None if is_moe else DenseFFN(c["d_model"], c["d_ff"], c["activation"])

    def forward(self, x, cos, sin, bias, cache, stream_TD, token_ids_T):
        x = x + self.attn(self.attn_norm(x), cos, sin, bias, cache)
        if self.moe is None:
            return x + self.ffn(self.ffn_norm(x)), stream_TD
        y, stream_TD = self.moe(self.ffn_norm(x), stream_TD, token_ids_T)
        return x + y, stream_TD


def is_moe_layer(c, m, i):
    every, offset = c.get("moe_every", 1), c.get("moe_offset", 0)
    return m is not None and every > 0 and i >= offset and (i - offset) % every == 0


def layer_moe(m, ordinal):
    """The `ordinal`-th MoE layer's section: `hash_router` in the first `hash_layers` of them."""
    return {**m, "router": m["hash_router"]} if ordinal < (m.get("hash_layers") or 0) else m


class MoEDistModel(nn.Module):
    """moe_dist's MoETransformer (same tensor names)."""

    def __init__(self, config):
        super().__init__()
        c, m = config.moe_dist_model, config.moe_dist_moe
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["d_model"])
        moe_layers = [i for i in range(c["n_layers"]) if is_moe_layer(c, m, i)]
        self.blocks = nn.ModuleList(Block(c, layer_moe(m, moe_layers.index(i)) if i in moe_layers else m,
                                          i in moe_layers, i) for i in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.lm_head = None if c["tie_embeddings"] else nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, tokens_BS, attention_mask_BW=None, cache=None, positions_BS=None):
        B, S = tokens_BS.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = tokens_BS.device
        if positions_BS is None:
            positions_BS = token_positions(attention_mask_BW, past, S, device)
        cos, sin = rotary_tables(positions_BS, self.c["head_dim"], self.c["rope_theta"])
        # Without padding and cache the causal kernel needs no mask (the training-time path).
        plain = past == 0 and (attention_mask_BW is None or bool(attention_mask_BW.all()))
        bias = None if plain else attention_bias(attention_mask_BW, past, S, device)
        x = self.embed(tokens_BS)
        stream_TD = x.detach().reshape(B * S, -1)
        token_ids_T = tokens_BS.reshape(-1)
        for block in self.blocks:
            x, stream_TD = block(x, cos, sin, bias, cache, stream_TD, token_ids_T)
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
            if name == "weight_D" or isinstance(module, QKNorm):
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
