"""The router interface: what a router receives and what it returns.

Legend: moe_dist/moe/__init__.py.

A router is a pure function of its input and its own parameters/buffers: it returns the chosen
experts and weights plus what losses and statistics need, and keeps nothing else. Aux losses and
statistics are computed from its output by `routing.losses` and `moe.stats`, the same for every
router. The only state a router may update is a statistics buffer (like BatchNorm's running mean),
and only in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class RouterConfig:
    """Fields every router config has; each router subclasses it with its own fields."""

    type: str = "topk"

    def check_layer(self, num_experts: int, top_k: int) -> None:
        """Rules tying this router's fields to the layer's `moe.num_experts` and `moe.top_k`
        (ConfigError); `MoEConfig` calls it once both are known."""


@dataclass(frozen=True, eq=False)
class ForcedRoute:
    """The routes one MoE layer must take for its T tokens, in the layer's token order (route
    replay, `moe_dist.routing.replay`)."""

    idx_TK: Tensor  # int64 expert ids
    w_TK: Tensor | None = None  # combine weights; None: the router's own at idx_TK


@dataclass
class RoutingContext:
    """What a router may know beyond its input.

    `all_reduce_sum` sums a detached tensor over the data-parallel group: routers whose routing
    depends on population statistics use it so that routing does not depend on how tokens are
    sharded (identity in one process). `dp_size` is that group's size.
    """

    training: bool
    all_reduce_sum: Callable[[Tensor], Tensor] = _identity
    dp_size: int = 1
    # COMET's independent routing stream (`fixed_projection` with source=embedding): the previous
    # MoE layer's stream state, or the token embeddings at the first MoE layer.
    stream_TD: Tensor | None = None
    # The input token id of each of the layer's T tokens (int64, layer token order): what `hash`
    # routes by. None where no model feeds it (a router that needs it then raises).
    token_ids_T: Tensor | None = None
    # Route replay: the experts to choose instead of the router's top-k (`routing.replay`). Every
    # router chooses through `choose_experts`, which takes these ids when given.
    forced: ForcedRoute | None = None
    # False for padding (bool per token): no population statistic counts it, so a padded batch
    # routes its real tokens as the same batch without padding would. None: every token is real.
    valid_T: Tensor | None = None


@dataclass
class RouterOutput:
    idx_TK: Tensor  # int64 expert ids
    w_TK: Tensor  # combine weights (carry the router's gradient)
    # Routing probabilities over all experts where the router defines them (softmax routers);
    # None for routers without a distribution (e.g. fixed projection with uniform weights).
    probs_TE: Tensor | None = None
    logits_TE: Tensor | None = None  # pre-softmax fp32 scores, for the z-loss
    # Tie-break for drop_policy="probs" when it should differ from w_TK (None: use w_TK).
    priority_TK: Tensor | None = None
    router_input_TD: Tensor | None = None  # what the scores were computed from (for L_s distances)
    stream_TD: Tensor | None = None  # routing-stream state to hand to the next MoE layer
    extra_aux: dict[str, Tensor] = field(default_factory=dict)  # router-specific unweighted losses


class Router(nn.Module):
    """Base class: subclasses implement `forward(x_TD, ctx) -> RouterOutput`."""

    def __init__(self, cfg, *, d_model: int, num_experts: int, top_k: int, layer_index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer_index = layer_index

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        """Hook run by the trainer after each optimizer step with the global pre-drop load."""

    @property
    def uses_step_load(self) -> bool:
        """Whether `after_step` reads the step's load: only then does the trainer all-reduce it, one
        collective per step. A router that overrides `after_step` for an option says whether it is on."""
        return type(self).after_step is not Router.after_step
