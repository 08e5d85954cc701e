"""`topk`: the learned top-k router (GShard / Switch / Mixtral / Qwen-MoE softmax, DeepSeek-V3
sigmoid scores), docs/routers/topk.md.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.common.config import check, check_choice, check_int
from moe_dist.routing.base import ForcedRoute, Router, RouterConfig, RouterOutput, RoutingContext
from moe_dist.routing.fp32_buffers import FP32Buffers
from moe_dist.routing.replay import choose_experts


@dataclass
class TopKRouterConfig(RouterConfig):
    type: str = "topk"
    # Renormalize the K chosen probabilities to sum to 1 (Mixtral, Qwen3, DeepSeek-V3). None: true
    # for K > 1, false for K = 1, resolved by `check_layer` (docs/routers/topk.md, "Why
    # renormalize defaults to true for K > 1": decided by the routing study).
    renormalize: bool | None = None
    # Multiplicative input jitter U(1-eps, 1+eps), training only (Switch).
    jitter_eps: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): a selection-only bias nudged after each step.
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    # Expert scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3).
    score: str = "softmax"
    # Mixtral's order: the top-k of the logits, then the softmax over the K chosen (the weights
    # sum to 1). Softmax only: sigmoid scores are per expert, their order changes nothing.
    score_after_topk: bool = False
    # Multiplies the combine weights (DeepSeek's routed_scaling_factor; upcycling).
    scale: float = 1.0
    # Group-limited selection (DeepSeek-V2/V3, docs/routers/topk.md "Group-limited routing"): the
    # experts form `expert_groups` contiguous groups (HF n_group), only the `topk_groups` best
    # groups (HF topk_group; None: all of them, no limit) may be chosen, groups ranked by
    # `group_score` of their selection scores.
    expert_groups: int = 1
    topk_groups: int | None = None
    group_score: str = "top2_sum"

    def __post_init__(self) -> None:
        check(self.renormalize is None or isinstance(self.renormalize, bool),
              f"router.renormalize must be true, false or null (true for top_k > 1), got {self.renormalize!r}")
        check(0.0 <= self.jitter_eps < 1.0, f"router.jitter_eps must be in [0, 1), got {self.jitter_eps!r}")
        check(self.bias_update_rate >= 0, f"router.bias_update_rate must be >= 0, got {self.bias_update_rate!r}")
        check_choice("router.score", self.score, SCORES)
        check(isinstance(self.score_after_topk, bool),
              f"router.score_after_topk must be true or false, got {self.score_after_topk!r}")
        check(not (self.score_after_topk and self.score != "softmax"),
              f"router.score_after_topk needs router.score softmax, got score {self.score!r} (sigmoid scores "
              f"do not depend on which experts are chosen)")
        check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0,
              f"router.scale must be a number > 0, got {self.scale!r}")
        check_group_limit(self)

    def check_layer(self, num_experts: int, top_k: int) -> None:
        check_group_layer(self, num_experts, top_k)
        self.renormalize = default_renormalize(self.renormalize, top_k)


def default_renormalize(renormalize: bool | None, top_k: int) -> bool:
    """`router.renormalize` as set, or its default: true for K > 1, where the study measured the
    renormalized weights' lower validation loss; false for K = 1, where one renormalized weight is
    always 1 and the router would get no gradient from the LM loss."""
    return top_k > 1 if renormalize is None else renormalize


SCORES = ("softmax", "sigmoid")
# How a group is ranked: DeepSeek-V3's noaux_tc (the sum of its two best selection scores) or
# DeepSeek-V2's group_limited_greedy (its best score).
GROUP_SCORES = ("top2_sum", "max")
GROUP_KEYS = ("expert_groups", "topk_groups", "group_score")


def check_group_limit(cfg) -> None:
    """The group fields on their own (`cfg`: any router config that has them); resolves
    `topk_groups` None to `expert_groups` (no limit)."""
    check_int("router.expert_groups", cfg.expert_groups, 1)
    if cfg.topk_groups is None:
        cfg.topk_groups = cfg.expert_groups
    check_int("router.topk_groups", cfg.topk_groups, 1)
    check(cfg.topk_groups <= cfg.expert_groups,
          f"router.topk_groups ({cfg.topk_groups}) must be <= router.expert_groups ({cfg.expert_groups})")
    check_choice("router.group_score", cfg.group_score, GROUP_SCORES)


def check_group_layer(cfg, num_experts: int, top_k: int) -> None:
    """The group fields against the layer (`moe.num_experts`, `moe.top_k`)."""
    groups = cfg.expert_groups
    check(num_experts % groups == 0,
          f"router.expert_groups ({groups}) must divide moe.num_experts ({num_experts})")
    per_group = num_experts // groups
    check(top_k <= cfg.topk_groups * per_group,
          f"moe.top_k ({top_k}) must be <= router.topk_groups ({cfg.topk_groups}) x the experts per group "
          f"({per_group}, num_experts / expert_groups): the allowed groups hold too few experts")
    check(not (cfg.group_score == "top2_sum" and groups > 1 and per_group < 2),
          f"router.group_score 'top2_sum' sums each group's two best scores, but router.expert_groups "
          f"({groups}) leaves {per_group} expert per group; use group_score 'max' or fewer groups")


def group_limit_mask(select_TE: Tensor, expert_groups: int, topk_groups: int, group_score: str) -> Tensor:
    """`select_TE` with the experts outside each token's `topk_groups` best groups set to -inf.

    A group's score is the sum of its two best selection scores (`top2_sum`) or its best one
    (`max`); groups are the contiguous blocks of E / expert_groups experts. Ties between groups
    go to torch.topk's choice, as in transformers' DeepseekV2/V3 routers."""
    T, E = select_TE.shape
    grouped_TGe = select_TE.view(T, expert_groups, E // expert_groups)
    if group_score == "top2_sum":
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_TG = grouped_TGe.amax(dim=-1)
    chosen_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    chosen_TG.scatter_(1, torch.topk(group_TG, topk_groups, dim=-1).indices, True)
    allowed_TE = chosen_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(T, E)
    return select_TE.masked_fill(~allowed_TE, float("-inf"))


def topk_from_logits(logits_TE: Tensor, top_k: int, renormalize: bool,
                     selection_bias_E: Tensor | None = None, *, score: str = "softmax",
                     score_after_topk: bool = False, scale: float = 1.0, expert_groups: int = 1,
                     topk_groups: int | None = None, group_score: str = "top2_sum",
                     forced: ForcedRoute | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over fp32 logits: returns (probs_TE, w_TK, idx_TK).

    Experts are chosen by their scores `s = softmax(logits)` or `sigmoid(logits)` (plus
    `selection_bias_E`, which shifts which experts are chosen but never their weights), among the
    experts of the `topk_groups` best of `expert_groups` groups (`group_limit_mask`). The
    weights are the chosen scores (with `score_after_topk`: the softmax over the K chosen
    logits), renormalized to sum 1 with `renormalize`, times `scale`.

    `probs_TE`, what the losses and statistics read, is a distribution over the experts: the
    softmax, or the sigmoid scores normalized to sum 1 per token (DeepSeek-V3's balance loss
    normalizes them the same way), so the Switch loss is 1 at balance for both.

    `forced` (route replay): the experts are its ids instead of the top-k; the weights follow
    the same formula at those ids.
    """
    if score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E
    if topk_groups is not None and topk_groups < expert_groups:
        select_TE = group_limit_mask(select_TE, expert_groups, topk_groups, group_score)
    idx_TK = choose_experts(select_TE, top_k, forced)
    if score_after_topk:
        w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
    else:
        w_TK = scores_TE.gather(1, idx_TK)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return probs_TE, (w_TK if scale == 1.0 else w_TK * scale), idx_TK


class LinearGate(nn.Module):
    """`logits = x @ W` in fp32 whatever the model's dtype: routing decisions are discontinuous, so
    bf16 rounding of the scores flips experts between otherwise identical runs."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=1.0 / math.sqrt(d_model))

    def forward(self, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.float(), self.weight_ED.float())


class TopKRouter(FP32Buffers, Router):  # fp32 bias: bf16 would swallow its 1e-3 steps
    def __init__(self, cfg: TopKRouterConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        self.renormalize = default_renormalize(cfg.renormalize, self.top_k)  # a config not checked by MoEConfig
        self.gate = LinearGate(self.d_model, self.num_experts)
        # Persistent so a resumed run keeps balancing where it stopped.
        self.register_buffer("selection_bias_E", torch.zeros(self.num_experts), persistent=True)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        if ctx.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        cfg = self.cfg
        logits_TE = self.gate(x_TD)
        bias = self.selection_bias_E if cfg.bias_balancing else None
        probs_TE, w_TK, idx_TK = topk_from_logits(logits_TE, self.top_k, self.renormalize, bias, score=cfg.score,
                                                  score_after_topk=cfg.score_after_topk, scale=cfg.scale,
                                                  expert_groups=cfg.expert_groups, topk_groups=cfg.topk_groups,
                                                  group_score=cfg.group_score, forced=ctx.forced)
        return RouterOutput(idx_TK=idx_TK, w_TK=w_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                            router_input_TD=x_TD)

    @property
    def uses_step_load(self) -> bool:
        return self.cfg.bias_balancing

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        if self.cfg.bias_balancing:
            nudge_selection_bias(self.selection_bias_E, load_E, self.cfg.bias_update_rate)


@torch.no_grad()
def nudge_selection_bias(bias_E: Tensor, load_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing step, in place: `b_e += rate * sign(mean_load - load_e)`, with
    `load_E` the global pre-drop counts (shared by every router that offers bias balancing)."""
    load_E = load_E.to(bias_E)
    bias_E += rate * torch.sign(load_E.mean() - load_E)
