"""`attentive`: the attentive gate for expert parallelism, with replicated key probes
(docs/routers/attentive.md; gate of Krishnamurthy, Watkins & Gärtner, arXiv 2302.14703).

Legend: moe_dist/moe/__init__.py (J: the gate width, the paper's h).

The paper's keys come from each expert's last hidden layer, which needs every expert to run on
every token: impossible before a capacity-limited dispatch. Instead each expert e owns a small
probe `h_e(x) = act(A_e x)`, `A_e` in R^{J x D}, replicated on every rank and trained through the
gate (E*J*D parameters per layer); then the paper's formula:
`q = W_q act(G x + b)`, `K_e = W_k h_e(x)`, `s_e = q . K_e / sqrt(J)`, `probs = softmax(s)`.
The probes are this project's substitute for the expert hidden layers, not the paper's method.
Selection and weights are `topk`'s (`renormalize: true` is the paper's top-k masking); the
scores are the logits of the z-loss, and the aux losses are `topk`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.common.config import check, check_choice
from moe_dist.routing.base import Router, RouterConfig, RouterOutput, RoutingContext
from moe_dist.routing.topk import check_group_layer, check_group_limit, topk_from_logits

GATE_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def attention_scores(q_TJ: Tensor, k_TEJ: Tensor) -> Tensor:
    """`s_TE = q . K_e / sqrt(J)`, for any rows T (the routing study passes a batch of inputs)."""
    return torch.einsum("tj,tej->te", q_TJ, k_TEJ) / math.sqrt(q_TJ.shape[-1])


@dataclass
class AttentiveConfig(RouterConfig):
    type: str = "attentive"
    hidden: int = 32  # J: width of the gate trunk, the query, the probes and the keys
    activation: str = "relu"
    # Renormalize the K chosen probabilities: the paper's top-k masking (softmax over the K
    # chosen scores). Off by default for the reason given in TopKRouterConfig.
    renormalize: bool = False
    # Group-limited selection on the gate's softmax scores, as `topk`'s (docs/routers/topk.md).
    expert_groups: int = 1
    topk_groups: int | None = None
    group_score: str = "top2_sum"

    def __post_init__(self) -> None:
        check(isinstance(self.hidden, int) and self.hidden >= 1,
              f"router.hidden must be an integer >= 1, got {self.hidden!r}")
        check_choice("router.activation", self.activation, tuple(GATE_ACTIVATIONS))
        check_group_limit(self)

    def check_layer(self, num_experts: int, top_k: int) -> None:
        check_group_layer(self, num_experts, top_k)


class AttentiveRouter(Router):
    def __init__(self, cfg: AttentiveConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        D, E, J = self.d_model, self.num_experts, cfg.hidden
        self.act = GATE_ACTIVATIONS[cfg.activation]
        self.gate_trunk = nn.Linear(D, J)
        self.w_q = nn.Linear(J, J, bias=False)
        self.w_k = nn.Linear(J, J, bias=False)
        self.probes_EJD = nn.Parameter(torch.empty(E, J, D))
        nn.init.uniform_(self.probes_EJD, -1.0 / math.sqrt(D), 1.0 / math.sqrt(D))  # nn.Linear's range

    def scores(self, x_TD: Tensor) -> Tensor:
        """`s_TE` in fp32 whatever the model's dtype (routing decisions are discontinuous)."""
        x = x_TD.float()
        q_TJ = F.linear(self.act(F.linear(x, self.gate_trunk.weight.float(), self.gate_trunk.bias.float())),
                        self.w_q.weight.float())
        probe_TEJ = self.act(torch.einsum("td,ejd->tej", x, self.probes_EJD.float()))
        return attention_scores(q_TJ, F.linear(probe_TEJ, self.w_k.weight.float()))

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        logits_TE = self.scores(x_TD)
        cfg = self.cfg
        probs_TE, w_TK, idx_TK = topk_from_logits(logits_TE, self.top_k, cfg.renormalize,
                                                  expert_groups=cfg.expert_groups, topk_groups=cfg.topk_groups,
                                                  group_score=cfg.group_score, forced=ctx.forced)
        return RouterOutput(idx_TK=idx_TK, w_TK=w_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                            router_input_TD=x_TD)
