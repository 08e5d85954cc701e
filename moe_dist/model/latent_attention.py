"""Multi-head latent attention (DeepSeek-V2, Liu et al. 2024; DeepSeek-V3), `model.attention: mla`.

Keys and values of every head are made from one shared low-rank latent per token,
`c = RMSNorm(x @ W_kv_down)` of width `kv_lora_rank`, and one shared rotary key of width
`qk_rope_head_dim`, so a KV cache holds those two (width kv_lora_rank + qk_rope_head_dim per
token and layer, whatever the number of heads) instead of every head's keys and values. The
query is low-rank too (`q_lora_rank`: down-projection, RMSNorm, up-projection) or a full-rank
projection (`q_lora_rank` None, DeepSeek-V2-Lite). Each query/key head is [non-rotary
(qk_nope_head_dim) | rotary (qk_rope_head_dim)]; the non-rotary part of the key and the value
come from the latent through `kv_up`, head-major: head h's rows are [k_nope (n); v (o)].

Rotary is moe_dist's half-split rotation (rotary.py). DeepSeek's checkpoints lay each rotary
part out as interleaved pairs; import-hf permutes those rows into the half-split order (the
dot products are the same), so nothing here depends on the checkpoint's convention. The softmax
scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times YaRN's mscale² where
`model.rope_scaling` sets `mscale_all_dim` (rope_scaling.py).

Legend: moe_dist/moe/__init__.py (c: latent width, l: query latent width, r: rotary width of a
head, n: its non-rotary width, o: value width of a head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.model.norm import QKNorm
from moe_dist.model.rotary import apply_rotary

# The latents' RMSNorms use DeepSeek's fixed epsilon, not the model's rms_norm_eps (DeepSeek's
# reference code and transformers' DeepseekV2/V3 build them with their default, 1e-6).
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, *, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_rope_head_dim: int, qk_nope_head_dim: int, v_head_dim: int, softmax_scale: float,
                 init_std: float, out_std: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.kv_lora_rank, self.rope_dim, self.nope_dim, self.v_dim = (kv_lora_rank, qk_rope_head_dim,
                                                                       qk_nope_head_dim, v_head_dim)
        self.softmax_scale = softmax_scale
        q_width = n_heads * (qk_nope_head_dim + qk_rope_head_dim)
        self.q_proj: nn.Linear | None = None
        self.q_down: nn.Linear | None = None
        self.q_norm: QKNorm | None = None
        self.q_up: nn.Linear | None = None
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_width, bias=False)
        else:
            self.q_down = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = QKNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_up = nn.Linear(q_lora_rank, q_width, bias=False)
        self.kv_down = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = QKNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.kv_up = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        for linear in (self.q_proj, self.q_down, self.q_up, self.kv_down, self.kv_up):
            if linear is not None:
                nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=out_std)

    @property
    def cache_widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of the two tensors a KV cache keeps per position: the latent and the
        rotary key, one 'head' each."""
        return (1, self.kv_lora_rank), (1, self.rope_dim)

    def project(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [B, H, S, n + r] with rotary on their last r dims, the normalized latent
        [B, 1, S, c] and the rotated shared key [B, 1, S, r]: what `attend` reads and what
        generation caches."""
        B, S, _ = x_BSD.shape
        H, n, r = self.n_heads, self.nope_dim, self.rope_dim
        q = self.q_proj(x_BSD) if self.q_up is None else self.q_up(self.q_norm(self.q_down(x_BSD)))
        q_BHSA = q.view(B, S, H, n + r).transpose(1, 2)
        q_BHSA = torch.cat([q_BHSA[..., :n], apply_rotary(q_BHSA[..., n:], cos_SR, sin_SR)], dim=-1)
        latent_BSc, k_rope_BSr = self.kv_down(x_BSD).split([self.kv_lora_rank, r], dim=-1)
        latent_B1Sc = self.kv_norm(latent_BSc)[:, None]
        k_rope_B1Sr = apply_rotary(k_rope_BSr[:, None], cos_SR, sin_SR)
        return q_BHSA, latent_B1Sc, k_rope_B1Sr

    def attend(self, q_BHSA: Tensor, latent_B1Wc: Tensor, k_rope_B1Wr: Tensor,
               mask_BSW: Tensor | None = None) -> Tensor:
        """Attention of S queries over the W positions' latents, then the output projection:
        causal (W = S) without a mask, else where the boolean `mask_BSW` ([B, 1, S, W]) is True."""
        H, n, o = self.n_heads, self.nope_dim, self.v_dim
        B, _, S, _ = q_BHSA.shape
        W = latent_B1Wc.shape[2]
        kv_BHWo = self.kv_up(latent_B1Wc[:, 0]).view(B, W, H, n + o).transpose(1, 2)
        k_nope_BHWn, v_BHWo = kv_BHWo.split([n, o], dim=-1)
        k_BHWA = torch.cat([k_nope_BHWn, k_rope_B1Wr.expand(B, H, W, self.rope_dim)], dim=-1)
        mask = {"is_causal": True} if mask_BSW is None else {"attn_mask": mask_BSW}
        y_BHSo = F.scaled_dot_product_attention(q_BHSA, k_BHWA, v_BHWo, scale=self.softmax_scale, **mask)
        return self.out(y_BHSo.transpose(1, 2).reshape(B, S, H * o))

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        return self.attend(*self.project(x_BSD, cos_SR, sin_SR))
