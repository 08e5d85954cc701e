"""Attention of the exported moe_dist model: RMSNorm, rotary positions, the padding/cache mask and
causal self-attention, as moe_dist's `model/norm.py`, `model/rotary.py` and `model/attention.py`
compute them. Self-contained (torch only); copied into the export with modeling_moe_dist.py.

- RMSNorm and rotary (half-split layout) in fp32, cast back to the input's dtype;
- the fused `qkv` projection's rows are [q (H*A); k (Y*A); v (Y*A)], each head-major, with an
  optional bias (`qkv_bias`, Qwen2);
- grouped-query attention (`n_kv_heads` Y < n_heads H): query head h reads key/value head
  h // (H / Y); the cache holds the Y key/value heads;
- q/k RMSNorm before rotary (`qk_norm`): `head`, one weight of width A for every head (Qwen3),
  or `full`, over the whole q and k projections before the split into heads (OLMoE);
- `n_heads * head_dim` may differ from the model width D (the output projection maps it back).

Legend (moe_dist's letters): B batch, S sequence (new tokens), W key positions (the cache's past
positions + the new ones), D model width, H query heads, Y key/value heads, A head width, R rotary
frequencies (A / 2).
"""

import torch
import torch.nn.functional as F
from torch import nn

# SDPA broadcasts key/value heads itself from torch 2.5 on; before, they are repeated here.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rotary_tables(positions_BS, head_dim, theta):
    """fp32 cos/sin [B, 1, S, R] at each token's position."""
    device = positions_BS.device
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_BSR = positions_BS.float()[..., None] * inv_freq_R
    return angles_BSR.cos()[:, None], angles_BSR.sin()[:, None]


def token_positions(attention_mask_BW, past_len, seq_len, device):
    """Each new token's position: the count of real tokens before it (so left padding does not
    shift a prompt), or past_len + i without a mask."""
    if attention_mask_BW is None:
        return (past_len + torch.arange(seq_len, device=device))[None]
    positions_BW = attention_mask_BW.long().cumsum(-1) - 1
    return positions_BW.clamp_min(0)[:, -seq_len:]


def attention_bias(attention_mask_BW, past_len, seq_len, device):
    """Boolean [B, 1, S, W] (True: may attend): causal over the cache and the new tokens, padding
    keys masked. Each query may always see itself, so a padding query's row is never empty."""
    W = past_len + seq_len
    q_S1 = past_len + torch.arange(seq_len, device=device)[:, None]
    k_1W = torch.arange(W, device=device)[None]
    allowed_SW = k_1W <= q_S1
    if attention_mask_BW is None:
        return allowed_SW[None, None]
    keys_BW = attention_mask_BW[:, -W:].bool()
    return ((allowed_SW[None] & keys_BW[:, None]) | (k_1W == q_S1)[None])[:, None]


def apply_rotary(x, cos_SR, sin_SR):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR], dim=-1).to(x.dtype)


def rms_norm(x, weight, eps):
    # fp32: in bf16 the mean of squares loses the precision the normalization relies on.
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d_model, eps):
        super().__init__()
        self.eps = eps
        self.weight_D = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return rms_norm(x, self.weight_D, self.eps)


class QKNorm(nn.Module):
    """moe_dist's query/key norm: the same RMSNorm, its parameter named `weight` (width A for
    `qk_norm: head`, the whole projection's for `full`)."""

    def __init__(self, width, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        self.q_width, self.kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(c["d_model"], self.q_width + 2 * self.kv_width, bias=c["qkv_bias"])
        self.out = nn.Linear(self.q_width, c["d_model"], bias=False)
        self.qk_norm = c["qk_norm"]
        self.q_norm = self.k_norm = None
        if self.qk_norm == "head":
            self.q_norm, self.k_norm = QKNorm(self.head_dim, c["norm_eps"]), QKNorm(self.head_dim, c["norm_eps"])
        elif self.qk_norm == "full":
            self.q_norm, self.k_norm = QKNorm(self.q_width, c["norm_eps"]), QKNorm(self.kv_width, c["norm_eps"])
        elif self.qk_norm != "none":
            raise ValueError(f"qk_norm {self.qk_norm!r} is not one of 'none', 'head', 'full'")

    def project(self, x_BSD, cos, sin):
        """q [B, H, S, A], k and v [B, Y, S, A], rotary applied."""
        B, S, _ = x_BSD.shape
        H, Y, A = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHA, k_BSYA, v_BSYA = q.view(B, S, H, A), k.view(B, S, Y, A), v.view(B, S, Y, A)
        if self.qk_norm == "head":
            q_BSHA, k_BSYA = self.q_norm(q_BSHA), self.k_norm(k_BSYA)
        q_BHSA = apply_rotary(q_BSHA.transpose(1, 2), cos, sin)
        k_BYSA = apply_rotary(k_BSYA.transpose(1, 2), cos, sin)
        return q_BHSA, k_BYSA, v_BSYA.transpose(1, 2)

    def forward(self, x_BSD, cos, sin, bias, cache):
        B, S, _ = x_BSD.shape
        H, Y = self.n_heads, self.n_kv_heads
        q_BHSA, k_BYWA, v_BYWA = self.project(x_BSD, cos, sin)
        if cache is not None:  # k, v become [B, Y, W, A]: the cached positions, then these
            k_BYWA, v_BYWA = cache.update(k_BYWA, v_BYWA, self.layer_idx)
        mask = {"is_causal": True} if bias is None else {"attn_mask": bias}
        if Y == H:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA, v_BYWA, **mask)
        elif _SDPA_GQA:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA, v_BYWA, enable_gqa=True, **mask)
        else:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA.repeat_interleave(H // Y, dim=1),
                                                    v_BYWA.repeat_interleave(H // Y, dim=1), **mask)
        return self.out(y_BHSA.transpose(1, 2).reshape(B, S, self.q_width))
