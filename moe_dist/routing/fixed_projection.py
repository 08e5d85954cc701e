"""`fixed_projection`: block COMET, fixed random routing (docs/routers/fixed_projection.md; Shaier
et al., COMET, arXiv 2410.08003).

Legend: moe_dist/moe/__init__.py (D is also the routing stream's width; each expert scores a block
of D / E stream units).

COMET masks single hidden units of a dense MLP; for expert parallelism each expert is a block of
units and a frozen projection `V` picks the blocks: `s_TE = u_TD V^T`, `idx = topk(s, K)`. `V` is
a persistent buffer drawn from a CPU generator seeded by (config seed, layer index): the same on
every rank and every EP size, never trained, never in the optimizer.

Router input (`source`):
- `hidden`: the layer's normalized hidden state;
- `embedding`: COMET's independent routing stream (detached, so routes of every layer are fixed
  per token by its embedding): `c = V_l z_{l-1}`, `z_l = kwta(c) * c`, and expert e scores the sum
  of its block of z_l. The router receives z_{l-1} in `ctx.stream_TD` (the token embeddings at the
  first MoE layer) and returns z_l in `RouterOutput.stream_TD`. The stream keeps the model width
  (d_route = D), so every layer's V_l is square: this project's choice.
`center: true` first removes the population mean (`inhibition`'s statistic,
docs/routers/inhibition.md): a fixed projection cannot learn to ignore a component every token
shares, which otherwise sends most tokens to the same experts and overflows their capacity.

No distribution over experts exists (the scores are not probabilities), so `probs_TE` is None and
no aux loss is emitted; optional aux-loss-free bias balancing shifts selection, never V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moe_dist.common.config import ConfigError, check, check_choice
from moe_dist.common.seeding import init_generator
from moe_dist.routing.base import Router, RouterConfig, RouterOutput, RoutingContext
from moe_dist.routing.comet import FIXED_ROUTING_KEY, active_units, frozen_projection, kwta_mask
from moe_dist.routing.fp32_buffers import FP32Buffers
from moe_dist.routing.inhibition import STATISTICS, PopulationInhibition
from moe_dist.routing.replay import choose_experts
from moe_dist.routing.topk import nudge_selection_bias

WEIGHTS = ("uniform", "softmax")
SOURCES = ("hidden", "embedding")


@dataclass
class FixedProjectionConfig(RouterConfig):
    type: str = "fixed_projection"
    seed: int = 0  # with the layer index, seeds V
    weights: str = "uniform"  # uniform: 1 per chosen expert (COMET); softmax: over the K chosen scores
    source: str = "hidden"
    stream_active_fraction: float = 0.5  # source=embedding: share of stream units kwta keeps
    center: bool = False
    center_stat: str = "ema"
    center_momentum: float = 0.99
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    # Why `expert_groups` and the other group keys are refused here (routing.registry).
    group_limit_refusal: ClassVar[str] = (
        "its scores are a frozen random projection, and a group limit is a constraint a learned gate adapts "
        "to (it learns to put a token's affinity into few groups); on fixed routes it would only discard a "
        "fixed share of each token's best-scoring blocks, a different fixed routing than COMET's")

    def __post_init__(self) -> None:
        check(isinstance(self.seed, int), f"router.seed must be an integer, got {self.seed!r}")
        check_choice("router.weights", self.weights, WEIGHTS)
        check_choice("router.source", self.source, SOURCES)
        check(0.0 < self.stream_active_fraction <= 1.0,
              f"router.stream_active_fraction must be in (0, 1], got {self.stream_active_fraction!r}")
        check_choice("router.center_stat", self.center_stat, STATISTICS)
        check(0.0 <= self.center_momentum < 1.0,
              f"router.center_momentum must be in [0, 1), got {self.center_momentum!r}")
        check(self.bias_update_rate >= 0, f"router.bias_update_rate must be >= 0, got {self.bias_update_rate!r}")


class FixedProjectionRouter(FP32Buffers, Router):
    def __init__(self, cfg: FixedProjectionConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        D, E = self.d_model, self.num_experts
        from_stream = cfg.source == "embedding"
        if from_stream and D % E:
            raise ConfigError(f"fixed_projection with source='embedding' splits the d_model ({D}) stream "
                              f"units into num_experts ({E}) equal blocks: d_model must be divisible by it")
        rows = D if from_stream else E
        g = init_generator(cfg.seed, self.layer_index, FIXED_ROUTING_KEY)
        self.register_buffer("v_projection", frozen_projection(rows, D, g), persistent=True)
        self.stream_k = active_units(D, cfg.stream_active_fraction)
        self.center = (PopulationInhibition(D, stat=cfg.center_stat, momentum=cfg.center_momentum)
                       if cfg.center else None)
        self.register_buffer("selection_bias_E", torch.zeros(E), persistent=True)

    def _input(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        if self.cfg.source == "hidden":
            u_TD = x_TD.float()
        elif ctx.stream_TD is None:
            raise ValueError("fixed_projection with source='embedding' needs the routing stream: pass "
                             "MoELayer.forward a MoESideInputs(stream_TD=...) holding the token embeddings "
                             "at the first MoE layer and the previous MoE layer's MoEOutput.stream after "
                             "it (MoETransformer does)")
        else:
            u_TD = ctx.stream_TD.reshape(-1, self.d_model).detach().float()
        return u_TD if self.center is None else self.center(u_TD, ctx)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        u_TD = self._input(x_TD, ctx)
        stream_TD = None
        if self.cfg.source == "hidden":
            scores_TE = u_TD @ self.v_projection.t()  # v_projection: [E, D]
        else:
            c_TD = u_TD @ self.v_projection.t()  # v_projection: [D, D]
            stream_TD = kwta_mask(c_TD, self.stream_k) * c_TD
            scores_TE = stream_TD.view(-1, self.num_experts, self.d_model // self.num_experts).sum(-1)

        select_TE = scores_TE + self.selection_bias_E if self.cfg.bias_balancing else scores_TE
        idx_TK = choose_experts(select_TE, self.top_k, ctx.forced)
        chosen_TK = scores_TE.gather(1, idx_TK)
        if self.cfg.weights == "softmax":
            w_TK = torch.softmax(chosen_TK, dim=-1)
        else:
            w_TK = torch.ones_like(chosen_TK)
        # Uniform weights tie; the scores still rank tokens for drop_policy="probs".
        return RouterOutput(idx_TK=idx_TK, w_TK=w_TK, priority_TK=chosen_TK.detach(), router_input_TD=u_TD,
                            stream_TD=stream_TD)

    @property
    def uses_step_load(self) -> bool:
        return self.cfg.bias_balancing

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        if self.cfg.bias_balancing:
            nudge_selection_bias(self.selection_bias_E, load_E, self.cfg.bias_update_rate)
