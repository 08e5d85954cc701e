"""The MoE layer: router -> capacity slots -> dispatch -> grouped experts -> combine.

Legend: moe_dist/moe/__init__.py.

The layer holds no distributed logic of its own: `dispatch`/`combine` move rows over the EP
group and `groups.all_reduce_sum_dp` makes statistics global. With `ParallelGroups.single()` it
is plain single-process PyTorch, the reference every EP run is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_dist.common.seeding import init_generator
from moe_dist.moe.capacity import SlotPlan, assign_slots, expert_capacity
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.dispatch import combine, dispatch
from moe_dist.moe.expert_mask import ExpertCometMask
from moe_dist.moe.experts import DenseFFN, GroupedExperts
from moe_dist.moe.stats import route_statistics
from moe_dist.parallel.groups import ParallelGroups, validate_parallel_sizes
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.losses import routing_losses, weighted_total
from moe_dist.routing.registry import build_router

# Keys of init_generator reserved for the non-expert parts of a layer (experts use their ids).
_ROUTER_KEY, _SHARED_KEY = -1, -2


@dataclass
class MoEOutput:
    y: Tensor  # same shape as the input
    aux_loss: Tensor | None  # sum of coefficient * loss; add to the LM loss (None: nothing weighted)
    # Unweighted, for logging; those with coefficient 0 carry no autograd graph.
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached, global over DP
    stream: Tensor | None = None  # routing-stream state for the next MoE layer (COMET embedding)


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, *, layer_index: int = 0, seed: int = 0,
                 groups: ParallelGroups | None = None) -> None:
        super().__init__()
        groups = groups or ParallelGroups.single()
        validate_parallel_sizes(groups.world_size, cfg.ep_size, cfg.num_experts)
        if groups.ep_size != cfg.ep_size:
            raise ValueError(f"moe.ep_size ({cfg.ep_size}) differs from the process groups' ep_size "
                             f"({groups.ep_size})")
        self.cfg = cfg
        self.groups = groups
        self.layer_index = layer_index
        self.first_expert = groups.ep_rank * cfg.num_local_experts

        # The router draws from a seed of its own, so its weights too are the same on every rank
        # and every EP size; fork_rng leaves the caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_generator(seed, layer_index, _ROUTER_KEY).initial_seed())
            self.router = build_router(cfg.router, d_model=cfg.d_model, num_experts=cfg.num_experts,
                                       top_k=cfg.top_k, layer_index=layer_index)

        self.experts = GroupedExperts(cfg.num_local_experts, cfg.d_model, cfg.d_ff, cfg.activation,
                                      first_expert=self.first_expert, seed=seed,
                                      layer_index=layer_index, init_std=cfg.init_std,
                                      impl=cfg.expert_impl)
        if cfg.comet_active_fraction is not None:
            self.experts.hidden_mask = ExpertCometMask(
                cfg.num_local_experts, self.first_expert, cfg.d_model, cfg.d_ff, cfg.comet_active_fraction,
                seed=seed, layer_index=layer_index)
        for p in self.experts.parameters():
            # DeepSpeed's contract: not all-reduced over DP, reduced over this EDP group instead.
            p.allreduce = False
            p.group_name = groups.group_name
        self.shared = None
        if cfg.num_shared_experts:
            self.shared = DenseFFN(cfg.d_model, cfg.d_ff * cfg.num_shared_experts, cfg.activation,
                                   init_std=cfg.init_std,
                                   generator=init_generator(seed, layer_index, _SHARED_KEY))

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.cfg.num_experts, self.cfg.top_k, cf,
                               self.cfg.min_capacity, self.cfg.dropless)

    def forward(self, x: Tensor, *, labels: Tensor | None = None, num_labels: int = 0,
                stream: Tensor | None = None, capacity_groups: int = 1) -> MoEOutput:
        """`x`: [..., D], the layer's (normalized) input. `labels`: optional per-token class ids
        ([...], -1 = none) for I(expert; label). `capacity_groups`: split the tokens into this many
        equal groups with separate capacity (and per-rank losses), as a single-process stand-in
        for that many ranks."""
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        ctx = RoutingContext(training=self.training, all_reduce_sum=self.groups.all_reduce_sum_dp,
                             dp_size=self.groups.dp_size, stream_TD=stream)
        route = self.router(x_TD, ctx)
        T = x_TD.shape[0]
        plan: SlotPlan = assign_slots(
            route.idx_TK, cfg.num_experts, self.capacity(T // capacity_groups), cfg.drop_policy,
            priority_TK=route.w_TK if route.priority_TK is None else route.priority_TK,
            num_groups=capacity_groups)

        source_UD, index_M, dplan = dispatch(x_TD, route.idx_TK, plan.keep_TK, plan.kept_E, self.groups)
        y_MD = self.experts(source_UD, index_M, dplan.counts_e)
        y_TD = combine(y_MD, route.w_TK, dplan, self.groups)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        stats = route_statistics(route, plan, ctx, labels, num_labels)
        coefficients = cfg.aux_loss.coefficients()
        losses = routing_losses(route, stats, self.groups.dp_size, cfg.aux_loss.sample_similarity_tokens,
                                with_sample_similarity=cfg.aux_loss.sample_similarity > 0,
                                num_groups=capacity_groups,
                                weighted={name for name, c in coefficients.items() if c})
        stats.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        return MoEOutput(y=y_TD.view(x.shape), aux_loss=weighted_total(losses, coefficients),
                         losses=losses, stats=stats, stream=route.stream_TD)
