"""Multi-token prediction (DeepSeek-V3's MTP module, `model.mtp_layers: 1`, docs/training.md).

Legend: moe_dist/moe/__init__.py (T = B*S; the block sees S - 1 positions).

At position t the main model has predicted token t+1 from its final hidden state `h_t` (after the
final norm, as Megatron-Core and vLLM pass it). The MTP block predicts token t+2 from
`eh_proj([enorm(emb(token t+1)); hnorm(h_t)])` (embedding first, the order of DeepSeek-V3's
`eh_proj` weight), run through one transformer block of its own (layer index n_layers, an MoE
block where the layer pattern puts one there), then its own final norm (`head_norm`, DeepSeek-V3's
`shared_head.norm`) and the model's shared output head; the embedding is shared too. Position t
needs token t+2, so the block runs on positions 0..S-2 of each sequence: causal attention makes
that what Megatron-Core computes on rolled inputs with the last position masked.

The block is `blocks[n_layers]` of the model, so its parameters are named `blocks.{n_layers}.*` like
DeepSeek-V3's `model.layers.{n_layers}.*` (`enorm`, `hnorm`, `eh_proj`, `head_norm` <-
`shared_head.norm`; the block's own parts as any layer's), and everything that handles an MoE
layer by its `blocks.{i}` name (sharded checkpoints, resharding, consolidation) handles its experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from moe_dist.model.block import TransformerBlock
from moe_dist.model.config import ModelConfig
from moe_dist.model.norm import RMSNorm
from moe_dist.moe.layer import MoEOutput, MoESideInputs
from moe_dist.parallel.groups import ParallelGroups


class MTPBlock(TransformerBlock):
    def __init__(self, cfg: ModelConfig, *, seed: int, groups: ParallelGroups) -> None:
        super().__init__(cfg, cfg.n_layers, seed=seed, groups=groups)
        D = cfg.d_model
        self.enorm = RMSNorm(D, cfg.norm_eps)
        self.hnorm = RMSNorm(D, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        nn.init.normal_(self.eh_proj.weight, std=cfg.init_std)
        self.head_norm = RMSNorm(D, cfg.norm_eps)

    def predict(self, h_BSD: Tensor, next_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor,
                side: MoESideInputs) -> tuple[Tensor, MoEOutput | None]:
        """`h_BSD`: the main model's normalized final hidden states at positions 0..S-2;
        `next_BSD`: the embeddings of the tokens at positions 1..S-1. Returns the normalized hidden
        states the head turns into the logits of the tokens at 2..S, and the MoE FFN's output."""
        x_BSD = self.eh_proj(torch.cat([self.enorm(next_BSD), self.hnorm(h_BSD)], dim=-1))
        x_BSD, moe_out = self(x_BSD, cos_SR, sin_SR, side)
        return self.head_norm(x_BSD), moe_out


def mtp_side_inputs(side: MoESideInputs, B: int, S: int) -> MoESideInputs:
    """The MoE side inputs of the MTP block, whose position t (0..S-2) predicts token t+2: the
    labels, routing stream and documents of positions 0..S-2, the token ids it embeds there
    (tokens 1..S-1), and the padding mask of its targets (a position counts where token t+2 is real)."""
    def first(t):  # positions 0..S-2 of each row, any trailing dimensions kept
        return None if t is None else t.reshape(B, S, -1)[:, :-1].reshape(B * (S - 1), *t.shape[1:])

    def shifted(t):  # positions 1..S-1
        return None if t is None else t.view(B, S)[:, 1:].reshape(-1)

    return replace(side, labels_T=first(side.labels_T), stream_TD=first(side.stream_TD),
                   token_ids_T=shifted(side.token_ids_T), valid_T=shifted(side.valid_T),
                   segment_ids_T=first(side.segment_ids_T))
