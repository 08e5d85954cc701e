"""The MoE layer: router -> capacity slots -> dispatch -> grouped experts -> combine.

Legend: moe_dist/moe/__init__.py.

The layer holds no distributed logic of its own: `dispatch`/`combine` move rows over the EP
group, and `groups.all_reduce_sum_dp` sums, only where a weighted loss is defined on global
counts, the counts it reads (`moe.stats.loss_counts`); the statistics it returns are this rank's.
With `ParallelGroups.single()` it is plain single-process PyTorch, the reference every EP run is
tested against. At EP 1 the forward and backward read nothing from the device (no host sync),
and `torch.compile(fullgraph=True)` takes the layer whole; the one exception is the receive
budget's `moe.overflow: error`, which reads its overflow report (moe/rank_budget.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_dist.common.config import ConfigError
from moe_dist.common.seeding import init_generator
from moe_dist.moe.balance import nonempty_segments, sequence_segments, with_step_prior
from moe_dist.moe.capacity import SlotPlan, assign_slots, expert_capacity
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.dispatch import combine, dispatch
from moe_dist.moe.expert_mask import ExpertCometMask
from moe_dist.moe.experts import DenseFFN, GroupedExperts
from moe_dist.moe.rank_budget import apply_rank_budget, overflow_report, raise_on_overflow, rank_budget
from moe_dist.moe.stats import budget_statistics, loss_counts, route_statistics
from moe_dist.parallel.groups import ParallelGroups, validate_parallel_sizes
from moe_dist.routing.base import ForcedRoute, RoutingContext
from moe_dist.routing.losses import routing_losses, weighted_total
from moe_dist.routing.registry import build_router
from moe_dist.routing.replay import with_forced_weights

# Keys of init_generator reserved for the non-expert parts of a layer (experts use their ids).
_ROUTER_KEY, _SHARED_KEY, _SHARED_GATE_KEY = -1, -2, -3


@dataclass(frozen=True, eq=False)
class MoESideInputs:
    """Everything an MoE layer reads besides its input `x`, in one argument.

    `MoETransformer.forward` builds it once per forward and hands it down its blocks; each MoE
    layer gets it as `MoELayer.forward(x, side)`, and the model passes the next MoE layer a copy
    with that layer's new routing stream (`handed_on`). Frozen: a layer cannot change what later
    layers see except through its `MoEOutput`. `MoESideInputs()` (the default of every forward)
    means no labels, one capacity group, no stream.

    - `labels_T`: a class id per token (the data's domain: language, source), in the layer's
      token order, -1 for none. It feeds only the statistics `expert_label_counts` and
      I(expert; label) (`moe.stats`); routing and losses never read it. None: no label statistics.
    - `num_labels`: L, the number of classes (`model.num_labels`); 0 also turns the label
      statistics off.
    - `capacity_groups`: a test device. The layer splits its T tokens into this many equal
      contiguous groups, each with its own capacity queues and its own per-rank losses, so that
      one process holding the tokens of n ranks (`capacity_groups=n`) drops, routes and weighs
      the losses exactly as an expert-parallel run over n ranks does: the single-process
      reference of the EP equivalence tests. 1 in training.
    - `stream_TD`: COMET's independent routing stream (`fixed_projection` with `source:
      embedding`, docs/routers/fixed_projection.md): the detached token embeddings at the first
      MoE layer, then the state the previous MoE layer's router returned (`MoEOutput.stream`).
      Routers that do not use it ignore it and pass it on unchanged; None where no model feeds
      one (a router that needs it then raises).
    - `token_ids_T`: the input token id of each of the layer's T tokens (int64, in the layer's
      token order), set by `MoETransformer.forward` from its tokens; the `hash` router routes by
      it (docs/routers/hash.md). None where no model feeds it (a router that needs it raises).
    - `trace`: every MoE layer returns its routing decisions (`MoEOutput.route`) for the routing
      trace (docs/routing_trace.md); False (the default) adds nothing to the forward.
    - `forced_routes`: route replay, by layer index: the routes a layer takes instead of its
      router's top-k (`routing.replay`); a layer not in it routes as usual.

    Balance masks and running counts (docs/training.md, "Balance-loss scopes"):

    - `valid_T`: bool per token, False for padding. Padding takes no capacity (its pairs are
      dropped before slots are handed out: `assign_slots`), reaches no expert (its output is
      the shared experts' alone, or 0), and is left out of every loss, count and statistic.
      None: every token is real.
    - `segment_ids_T`: int64 per token, the packed document it belongs to, numbered from 0 within
      each row of the batch (so below S). Only the `sequence` balance scope reads it: each
      document is then its own sequence. None: each row of a [B, S, D] input is one sequence.
    - `step_counts`: for the `global_batch` scope, per MoE layer index the global counts of the
      optimizer step's earlier micro batches (`MoEOutput.step_counts` of the previous micro
      batch; None or missing at the step's first). The trainer owns it and starts each
      optimizer step from None.
    - `budget_ranks`: a test device beside `capacity_groups`: the number of EP ranks the receive
      budget (`moe.rank_capacity_factor`, moe/rank_budget.py) splits the experts over, so that the
      single-process reference budgets each capacity group's rows per destination rank as an EP
      run of that size does. 0 in training: the layer's own `ep_size`.
    """

    labels_T: Tensor | None = None
    num_labels: int = 0
    capacity_groups: int = 1
    stream_TD: Tensor | None = None
    token_ids_T: Tensor | None = None
    trace: bool = False
    forced_routes: Mapping[int, ForcedRoute] | None = None
    valid_T: Tensor | None = None
    segment_ids_T: Tensor | None = None
    step_counts: dict[int, dict[str, Tensor]] | None = None
    budget_ranks: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.capacity_groups, int) and self.capacity_groups >= 1):
            raise ValueError(f"capacity_groups must be an integer >= 1, got {self.capacity_groups!r}")
        if not (isinstance(self.budget_ranks, int) and self.budget_ranks >= 0):
            raise ValueError(f"budget_ranks must be an integer >= 0, got {self.budget_ranks!r}")
        if not (isinstance(self.num_labels, int) and self.num_labels >= 0):
            raise ValueError(f"num_labels must be an integer >= 0, got {self.num_labels!r}")
        if self.valid_T is not None and self.valid_T.dtype != torch.bool:
            raise ValueError(f"valid_T must be a bool tensor (False = padding), got dtype {self.valid_T.dtype}")
        if self.segment_ids_T is not None and self.segment_ids_T.dtype.is_floating_point:
            raise ValueError(f"segment_ids_T must be an integer tensor, got dtype {self.segment_ids_T.dtype}")

    def handed_on(self, stream_TD: Tensor | None) -> MoESideInputs:
        """The side inputs of the next MoE layer: this layer's new routing stream, if its router
        returned one (the rest never changes within a forward)."""
        return self if stream_TD is None else replace(self, stream_TD=stream_TD)


_NO_SIDE_INPUTS = MoESideInputs()


@dataclass(frozen=True, eq=False)
class RouteRecord:
    """One layer's routing decisions for the routing trace, all detached: the experts and weights
    the router chose, before capacity, and what became of each (token, choice) pair."""

    idx_TK: Tensor  # int64 expert ids
    w_TK: Tensor  # combine weights as the router returned them (before drops)
    keep_TK: Tensor  # bool: the pair got a slot
    spilled_TK: Tensor | None = None  # bool: the pair was served elsewhere than its slot (None: none)


@dataclass
class MoEOutput:
    y: Tensor  # same shape as the input
    aux_loss: Tensor | None  # sum of coefficient * loss; add to the LM loss (None: nothing weighted)
    # Unweighted, for logging; those with coefficient 0 carry no autograd graph.
    losses: dict[str, Tensor] = field(default_factory=dict)
    # Detached, this rank's (moe.stats: the summable counts and their ratios; no collective).
    stats: dict[str, Tensor] = field(default_factory=dict)
    # Routing-stream state for the next MoE layer (COMET embedding; see MoESideInputs.handed_on).
    stream: Tensor | None = None
    # This layer's routing decisions, only when `MoESideInputs.trace` asked for them.
    route: RouteRecord | None = None
    # With a global_batch scope: the step's global counts so far, this micro batch's included
    # (the next micro batch's `MoESideInputs.step_counts[layer_index]`). None otherwise.
    step_counts: dict[str, Tensor] | None = None


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, *, layer_index: int = 0, seed: int = 0,
                 groups: ParallelGroups | None = None, recompute: str = "none") -> None:
        """`recompute`: what of the experts' work is redone in the backward instead of kept
        (`moe_dist.moe.recompute`; `model.moe_recompute`). The router, dispatch and statistics
        are never recomputed."""
        super().__init__()
        groups = groups or ParallelGroups.single()
        validate_parallel_sizes(groups.world_size, cfg.ep_size, cfg.num_experts)
        if groups.ep_size != cfg.ep_size:
            raise ConfigError(f"moe.ep_size ({cfg.ep_size}) differs from the process groups' ep_size "
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
                                      impl=cfg.expert_impl, recompute=recompute)
        if cfg.comet_active_fraction is not None:
            self.experts.hidden_mask = ExpertCometMask(
                cfg.num_local_experts, self.first_expert, cfg.d_model, cfg.d_ff, cfg.comet_active_fraction,
                seed=seed, layer_index=layer_index)
        for p in self.experts.parameters():
            # DeepSpeed's contract: not all-reduced over DP, reduced over this EDP group instead.
            p.allreduce = False
            p.group_name = groups.group_name
        # Shared experts (and their gate) are ordinary replicated parameters, reduced over DP.
        self.shared = None
        self.shared_gate = None
        if cfg.num_shared_experts:
            self.shared = DenseFFN(cfg.d_model, cfg.shared_d_ff, cfg.activation, init_std=cfg.init_std,
                                   generator=init_generator(seed, layer_index, _SHARED_KEY))
        if cfg.shared_gate:
            self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
            with torch.no_grad():
                self.shared_gate.weight.copy_(torch.randn(
                    1, cfg.d_model, generator=init_generator(seed, layer_index, _SHARED_GATE_KEY)) * cfg.init_std)

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.cfg.num_experts, self.cfg.top_k, cf,
                               self.cfg.min_capacity, self.cfg.dropless)

    def _raise_on_overflow(self, reports: list[list[int]], budget: int) -> None:
        """`moe.overflow: error`: stop if any source rank's report asks a rank for more than the
        budget (rank i of `reports` is EP rank i, or the reference's capacity group i)."""
        raise_on_overflow(reports, budget, layer=self.layer_index, factor=self.cfg.rank_capacity_factor)

    def _shared_output(self, x_TD: Tensor) -> Tensor:
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    def forward(self, x: Tensor, side: MoESideInputs | None = None) -> MoEOutput:
        """`x`: [..., D], the layer's (normalized) input. `side`: labels for the statistics,
        capacity groups and the routing stream (see `MoESideInputs`); None: none of them."""
        cfg = self.cfg
        side = _NO_SIDE_INPUTS if side is None else side
        num_groups = side.capacity_groups
        x_TD = x.reshape(-1, cfg.d_model)
        forced = None if side.forced_routes is None else side.forced_routes.get(self.layer_index)
        T = x_TD.shape[0]
        valid_T = None if side.valid_T is None else side.valid_T.reshape(-1)
        if valid_T is not None and valid_T.numel() != T:
            raise ValueError(f"MoESideInputs.valid_T has {valid_T.numel()} entries for the input's {T} tokens")
        ctx = RoutingContext(training=self.training, all_reduce_sum=self.groups.all_reduce_sum_dp,
                             dp_size=self.groups.dp_size, stream_TD=side.stream_TD,
                             token_ids_T=side.token_ids_T, forced=forced, valid_T=valid_T)
        route = self.router(x_TD, ctx)
        if forced is not None:
            if route.idx_TK is not forced.idx_TK:  # identity, not values: no read of the device
                raise ValueError(f"router {self.cfg.router.type!r} of MoE layer {self.layer_index} ignores "
                                 f"forced routes (it must choose through routing.replay.choose_experts)")
            route = with_forced_weights(route, forced)
        # Capacity is sized from every token, padding included: a static shape (sizing it from
        # the real tokens would read the device).
        plan: SlotPlan = assign_slots(
            route.idx_TK, cfg.num_experts, self.capacity(T // num_groups), cfg.drop_policy,
            priority_TK=route.w_TK if route.priority_TK is None else route.priority_TK,
            num_groups=num_groups, valid_T=valid_T)
        idx_TK, w_TK, budget_stats, report_R = route.idx_TK, route.w_TK, None, None
        ranks = side.budget_ranks or cfg.ep_size
        budget = rank_budget(T // num_groups, cfg.top_k, ranks, cfg.rank_capacity_factor if self.training else 0.0)
        if budget is not None:
            if cfg.overflow == "error":
                report_R = overflow_report(idx_TK, plan.keep_TK, cfg.num_experts, ranks, num_groups)
                if self.groups.ep_size == 1:  # the one host read the budget makes (EP > 1: dispatch's)
                    self._raise_on_overflow(report_R.tolist(), budget)
                    report_R = None
            bounded = apply_rank_budget(idx_TK, w_TK, plan, num_experts=cfg.num_experts, ranks=ranks,
                                        budget=budget, policy=cfg.overflow, probs_TE=route.probs_TE,
                                        spill_choices=cfg.spill_choices, num_groups=num_groups)
            idx_TK, w_TK, plan = bounded.idx_TK, bounded.w_TK, bounded.plan
            budget_stats = budget_statistics(bounded.over_budget_TK, plan.spilled_TK)

        source_UD, index_M, dplan = dispatch(x_TD, idx_TK, plan.keep_TK, plan.kept_E, self.groups,
                                             None if report_R is None else report_R.reshape(-1))
        if dplan.reports is not None:
            self._raise_on_overflow(dplan.reports, budget)
        y_MD = self.experts(source_UD, index_M, dplan.counts_e)
        y_TD = combine(y_MD, w_TK, dplan, self.groups)
        if self.shared is not None:
            if self.experts.recompute == "experts" and torch.is_grad_enabled():
                y_TD = y_TD + checkpoint(self._shared_output, x_TD, use_reentrant=False)
            else:
                y_TD = y_TD + self._shared_output(x_TD)

        stats = route_statistics(route, plan, side.labels_T, side.num_labels, valid_T)
        if budget_stats is not None:
            stats.update(budget_stats)
        coefficients = cfg.aux_loss.coefficients()
        weighted = {name for name, c in coefficients.items() if c}
        scopes = cfg.aux_loss.scopes()
        sequences = None
        if route.probs_TE is not None and "sequence" in scopes.values():
            sequences = sequence_segments(x.shape, side.segment_ids_T, x.device)
            stats["num_sequences"] = nonempty_segments(sequences, valid_T)
        counts = loss_counts(stats, weighted, ctx.all_reduce_sum, scopes)
        step_counts = None
        if route.probs_TE is not None and "global_batch" in scopes.values():
            counts, step_counts = with_step_prior(counts, (side.step_counts or {}).get(self.layer_index))
        losses = routing_losses(route, counts, self.groups.dp_size,
                                cfg.aux_loss.sample_similarity_tokens,
                                with_sample_similarity=cfg.aux_loss.sample_similarity > 0,
                                num_groups=num_groups, weighted=weighted, scopes=scopes, valid_T=valid_T,
                                sequences=sequences)
        stats.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        record = None
        if side.trace:
            record = RouteRecord(idx_TK=route.idx_TK, w_TK=route.w_TK.detach(), keep_TK=plan.keep_TK,
                                 spilled_TK=plan.spilled_TK)
        return MoEOutput(y=y_TD.view(x.shape), aux_loss=weighted_total(losses, coefficients),
                         losses=losses, stats=stats, stream=route.stream_TD, route=record,
                         step_counts=step_counts)
