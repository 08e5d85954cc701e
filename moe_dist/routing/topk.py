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

from moe_dist.common.config import check, check_choice
from moe_dist.routing.base import ForcedRoute, Router, RouterConfig, RouterOutput, RoutingContext
from moe_dist.routing.fp32_buffers import FP32Buffers
from moe_dist.routing.replay import choose_experts


@dataclass
class TopKRouterConfig(RouterConfig):
    type: str = "topk"
    # Renormalize the K chosen probabilities to sum to 1 (Mixtral). With K=1 this makes every
    # weight 1 and cuts the router's gradient from the LM loss, so it defaults off.
    renormalize: bool = False
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

    def __post_init__(self) -> None:
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


SCORES = ("softmax", "sigmoid")


def topk_from_logits(logits_TE: Tensor, top_k: int, renormalize: bool,
                     selection_bias_E: Tensor | None = None, *, score: str = "softmax",
                     score_after_topk: bool = False, scale: float = 1.0,
                     forced: ForcedRoute | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over fp32 logits: returns (probs_TE, w_TK, idx_TK).

    Experts are chosen by their scores `s = softmax(logits)` or `sigmoid(logits)` (plus
    `selection_bias_E`, which shifts which experts are chosen but never their weights). The
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
        probs_TE, w_TK, idx_TK = topk_from_logits(logits_TE, self.top_k, cfg.renormalize, bias, score=cfg.score,
                                                  score_after_topk=cfg.score_after_topk, scale=cfg.scale,
                                                  forced=ctx.forced)
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
