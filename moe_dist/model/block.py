"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)), where the FFN is a
dense `DenseFFN` or an expert-parallel `MoELayer`.

Legend: moe_dist/moe/__init__.py (T = B*S).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_dist.model.attention import CausalSelfAttention
from moe_dist.model.config import ModelConfig
from moe_dist.model.latent_attention import LatentAttention
from moe_dist.model.norm import RMSNorm
from moe_dist.model.rope_scaling import softmax_scale
from moe_dist.moe.experts import DenseFFN
from moe_dist.moe.layer import MoELayer, MoEOutput, MoESideInputs
from moe_dist.parallel.groups import ParallelGroups


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, *, seed: int, groups: ParallelGroups) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.checkpointing = cfg.activation_checkpointing
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # GPT-2's scaling of residual-branch outputs keeps the stream's variance flat in depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn: CausalSelfAttention | LatentAttention
        if cfg.attention == "mla":
            self.attn = LatentAttention(cfg.d_model, cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
                                        kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                                        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
                                        softmax_scale=softmax_scale(cfg.head_dim, cfg.rope_scaling),
                                        init_std=cfg.init_std, out_std=out_std)
        else:
            self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, init_std=cfg.init_std, out_std=out_std,
                                            n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, qk_norm=cfg.qk_norm,
                                            qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe: MoELayer | None = None
        self.ffn: DenseFFN | None = None
        if cfg.is_moe_layer(layer_index):
            # Experts and router draw from (seed, layer_index, ...) generators of their own: the
            # same weights for every ep_size, and the global RNG stream is left untouched.
            self.moe = MoELayer(cfg.moe_config(layer_index), layer_index=layer_index, seed=seed, groups=groups,
                                recompute=cfg.moe_recompute)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, init_std=cfg.init_std)

    def _attention(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        return self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR)

    def _dense_ffn(self, x_BSD: Tensor) -> Tensor:
        return self.ffn(self.ffn_norm(x_BSD))

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor,
                side: MoESideInputs | None = None) -> tuple[Tensor, MoEOutput | None]:
        """`side`: what the MoE FFN reads besides its input (`MoESideInputs`; a dense block
        ignores it)."""
        if self.checkpointing and self.training:
            x_BSD = x_BSD + checkpoint(self._attention, x_BSD, cos_SR, sin_SR, use_reentrant=False)
        else:
            x_BSD = x_BSD + self._attention(x_BSD, cos_SR, sin_SR)
        if self.moe is None:
            if self.checkpointing and self.training:
                return x_BSD + checkpoint(self._dense_ffn, x_BSD, use_reentrant=False), None
            return x_BSD + self._dense_ffn(x_BSD), None
        # The MoE FFN as a whole is never recomputed: a second forward would repeat its all-to-alls
        # and loss-counts all-reduce in backward and update router statistic buffers twice. Its
        # experts alone are, under `model.moe_recompute` (inside MoELayer).
        out = self.moe(self.ffn_norm(x_BSD), side)
        return x_BSD + out.y, out
