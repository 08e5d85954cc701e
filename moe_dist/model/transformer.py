"""A decoder-only transformer language model whose FFNs are MoE layers on every `moe_every`-th
layer (from `moe_offset`) and dense elsewhere. Plain single-process PyTorch: expert parallelism
lives entirely inside `MoELayer` and the `ParallelGroups` it is given.

Legend: moe_dist/moe/__init__.py (T = B*S).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.model.block import TransformerBlock
from moe_dist.model.config import ModelConfig
from moe_dist.model.mtp import MTPBlock, mtp_side_inputs
from moe_dist.model.norm import RMSNorm
from moe_dist.model.rotary import rotary_tables
from moe_dist.moe.layer import MoELayer, MoESideInputs, RouteRecord
from moe_dist.moe.legacy_names import migrate_state_dict_in_place
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.base import ForcedRoute


@dataclass
class ModelOutput:
    logits_BSV: Tensor
    # lm_loss + aux_loss (+ mtp_loss_weight * mtp_loss): what training back-propagates (None without targets)
    loss: Tensor | None
    lm_loss: Tensor | None  # mean next-token cross entropy over this rank's real (unmasked) positions
    aux_loss: Tensor  # sum over MoE layers of the coefficient-weighted routing losses (0 if none)
    # Per MoE layer (by layer index): detached routing statistics of this rank's tokens (summed over
    # ranks by the trainer and evaluation, once per interval),
    # including the unweighted aux losses as `loss_<name>` (moe_dist.moe.stats,
    # docs/routers/statistics.md).
    moe_stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    # Multi-token prediction's cross entropy (token t+2; unweighted, included in `loss` times
    # model.mtp_loss_weight); None without MTP, targets or in eval mode.
    mtp_loss: Tensor | None = None
    # Per MoE layer, with `trace=True` only: its routing decisions (the routing trace).
    routes: dict[int, RouteRecord] = field(default_factory=dict)
    # Per MoE layer with a global_batch balance scope: the optimizer step's running counts, for
    # the next micro batch's `step_counts` (MoESideInputs.step_counts).
    step_counts: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def _migrate_legacy_names(module, state_dict, prefix, *_) -> None:
    migrate_state_dict_in_place(state_dict, prefix, f"the state dict loaded into {type(module).__name__}")


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, seed: int = 0, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        groups = groups or ParallelGroups.single()
        self.cfg = cfg
        # Besides the initial weights, the seed draws frozen constants no checkpoint carries
        # (COMET's expert-mask projections): a loader must rebuild the model with the same one.
        self.seed = seed
        # Dense weights come from the global RNG seeded here, so every rank builds the same ones
        # (MoE layers draw from generators of their own, see TransformerBlock); fork_rng leaves
        # the caller's RNG state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
            self.blocks = nn.ModuleList(TransformerBlock(cfg, i, seed=seed, groups=groups)
                                        for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = None
            if not cfg.tie_embeddings:
                self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
                nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
            if cfg.mtp_layers:
                # Last, so that every other weight is drawn as without MTP.
                self.blocks.append(MTPBlock(cfg, seed=seed, groups=groups))
        # Checkpoints written before the parameters' rename load too, by any path that ends in
        # load_state_dict (DeepSpeed's engine included).
        self.register_load_state_dict_pre_hook(_migrate_legacy_names)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(b.layer_index, b.moe) for b in self.blocks if b.moe is not None]

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None,
                domain_ids_BS: Tensor | None = None, *, capacity_groups: int = 1,
                valid_BS: Tensor | None = None, segment_ids_BS: Tensor | None = None,
                step_counts: dict[int, dict[str, Tensor]] | None = None, trace: bool = False,
                forced_routes: Mapping[int, ForcedRoute] | None = None, budget_ranks: int = 0) -> ModelOutput:
        """`domain_ids_BS`: per-token domain labels (-1 = none) for I(expert; domain).
        `capacity_groups`: a single-process stand-in for that many ranks (see `MoESideInputs`).
        `valid_BS`: bool, False at the positions that do not count (padding: Megatron's loss
        mask): they are left out of the LM loss, routing capacity, every routing loss and
        statistic. Attention does not mask them, so only trailing padding leaves the other
        positions' values unchanged. None: every position counts.
        `segment_ids_BS`: packed documents (numbered from 0 within each row) for the sequence
        balance scope. `step_counts`: the global_batch scope's running counts
        (`ModelOutput.step_counts` of the step's previous micro batch; None at its first).
        `trace`: return every MoE layer's routing decisions (`ModelOutput.routes`).
        `forced_routes`: route replay, by layer index, tokens in (B, S) order (`MoESideInputs`).
        `budget_ranks`: with `capacity_groups`, the single-process stand-in for that many EP ranks'
        receive budget (`MoESideInputs.budget_ranks`); 0: the layers' own `ep_size`."""
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length ({S}) exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        cos_SR, sin_SR = rotary_tables(S, self.cfg.rotary_dim, self.cfg.rope_theta, tokens_BS.device,
                                     self.cfg.rope_scaling)
        x_BSD = self.embed(tokens_BS)
        num_labels = self.cfg.num_labels
        # The MoE layers' side inputs, built once. COMET's independent routing stream starts at the
        # token embeddings (no gradient) and is handed from one MoE layer to the next; a router
        # that does not transform it passes it on.
        side = MoESideInputs(
            labels_T=domain_ids_BS.reshape(-1) if domain_ids_BS is not None and num_labels else None,
            num_labels=num_labels, capacity_groups=capacity_groups,
            stream_TD=x_BSD.detach().reshape(B * S, -1), token_ids_T=tokens_BS.reshape(-1),
            valid_T=None if valid_BS is None else valid_BS.reshape(-1),
            segment_ids_T=None if segment_ids_BS is None else segment_ids_BS.reshape(-1),
            step_counts=step_counts, trace=trace, forced_routes=forced_routes, budget_ranks=budget_ranks)
        aux_terms: list[Tensor] = []
        moe_stats: dict[int, dict[str, Tensor]] = {}
        routes: dict[int, RouteRecord] = {}
        new_step_counts: dict[int, dict[str, Tensor]] = {}
        for block in self.blocks[:self.cfg.n_layers]:
            x_BSD, moe_out = block(x_BSD, cos_SR, sin_SR, side)
            if moe_out is None:
                continue
            moe_stats[block.layer_index] = moe_out.stats
            if moe_out.route is not None:
                routes[block.layer_index] = moe_out.route
            if moe_out.step_counts is not None:
                new_step_counts[block.layer_index] = moe_out.step_counts
            if moe_out.aux_loss is not None:
                aux_terms.append(moe_out.aux_loss)
            side = side.handed_on(moe_out.stream)
        h_BSD = self.norm(x_BSD)
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BSV = h_BSD @ weight_VD.t()
        # Only training reads the MTP prediction: evaluation and generation are the main model's.
        mtp_loss = None
        if self.cfg.mtp_layers and self.training and targets_BS is not None:
            if S < 2:
                raise ValueError(f"model.mtp_layers predicts token t+2: training sequences need >= 2 tokens, got {S}")
            mtp_h_BSD, mtp_out = self.blocks[self.cfg.n_layers].predict(
                h_BSD[:, :-1], self.embed(targets_BS[:, :-1]), cos_SR[:S - 1], sin_SR[:S - 1],
                mtp_side_inputs(side, B, S))
            if mtp_out is not None:
                moe_stats[self.cfg.n_layers] = mtp_out.stats
                if mtp_out.step_counts is not None:
                    new_step_counts[self.cfg.n_layers] = mtp_out.step_counts
                if mtp_out.aux_loss is not None:
                    aux_terms.append(mtp_out.aux_loss)
            mtp_logits_BSV = mtp_h_BSD @ weight_VD.t()
            if valid_BS is None:
                mtp_loss = F.cross_entropy(mtp_logits_BSV.float().reshape(B * (S - 1), -1),
                                           targets_BS[:, 1:].reshape(-1))
            else:  # position t predicts token t+2: it counts where that target is real
                mtp_loss = masked_lm_loss(mtp_logits_BSV, targets_BS[:, 1:], valid_BS[:, 1:], capacity_groups)
        aux_loss = torch.stack(aux_terms).sum() if aux_terms else logits_BSV.new_zeros((), dtype=torch.float32)
        lm_loss = loss = None
        if targets_BS is not None:
            # fp32 softmax: a bf16 log-sum-exp over a large vocabulary is visibly biased.
            if valid_BS is None:
                lm_loss = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1))
            else:
                lm_loss = masked_lm_loss(logits_BSV, targets_BS, valid_BS, capacity_groups)
            loss = lm_loss + aux_loss
            if mtp_loss is not None:
                loss = loss + self.cfg.mtp_loss_weight * mtp_loss
        return ModelOutput(logits_BSV=logits_BSV, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss,
                           moe_stats=moe_stats, mtp_loss=mtp_loss, routes=routes, step_counts=new_step_counts)


def masked_lm_loss(logits_BSV: Tensor, targets_BS: Tensor, valid_BS: Tensor, num_groups: int = 1) -> Tensor:
    """Mean next-token cross entropy over the positions `valid_BS` keeps: the unpadded batch's
    loss. Per rank, like the unmasked mean: ranks (and the `num_groups` row groups a
    single-process reference holds, one per rank) weigh equally, whatever their real tokens."""
    B = targets_BS.shape[0]
    if B % num_groups:
        raise ValueError(f"capacity_groups ({num_groups}) must divide the batch ({B} rows)")
    nll_BS = F.cross_entropy(logits_BSV.float().transpose(1, 2), targets_BS, reduction="none")
    nll_BS = torch.where(valid_BS, nll_BS, torch.zeros_like(nll_BS))
    tokens_per_group = valid_BS.reshape(num_groups, -1).float().sum(1)
    return (nll_BS.reshape(num_groups, -1).sum(1) / tokens_per_group.clamp_min(1.0)).mean()
