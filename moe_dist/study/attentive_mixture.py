"""The attentive gate of Krishnamurthy, Watkins & Gärtner (arXiv 2302.14703) in its paper form:
a dense mixture in which every expert runs on every input (docs/routers/attentive.md, "Math").

Legend: B inputs, I input width, O output width, E experts, K experts kept by top-k, J gate/key
width (moe_dist/moe/__init__.py's J; the paper's h, 32 in its MNIST setup).

    q = W_q g(x)             g: the gate trunk (hidden size J, no output layer)
    K_e = W_k h_e(x)         h_e: expert e's last hidden layer (size J)
    s_e = q . K_e / sqrt(J)  p(e|x) = softmax_e(s_e)
    y = sum_e p(e|x) y_e(x)

W_q and W_k have no bias; the gate trunk, W_q, W_k and the experts train together with one
optimizer. The top-k variant masks all but the k largest scores to -inf before the softmax.
It reuses the expert-parallel router's `attention_scores` (`moe_dist/routing/attentive.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_dist.routing.attentive import GATE_ACTIVATIONS, attention_scores


def masked_softmax(scores_BE: Tensor, top_k: int | None) -> Tensor:
    """softmax over the experts; with `top_k`, every score but the k largest is -inf first."""
    if top_k is not None:
        idx_BK = torch.topk(scores_BE, top_k, dim=-1).indices
        keep = torch.zeros_like(scores_BE, dtype=torch.bool).scatter_(-1, idx_BK, True)
        scores_BE = scores_BE.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores_BE, dim=-1)


class MLPExpert(nn.Module):
    """`x -> act(...act(x W_1)...) = h_e(x)` (width J) `-> h_e(x) W_out`: the body's last hidden
    layer is what the gate's key sees."""

    def __init__(self, d_in: int, d_out: int, hidden: int, depth: int, activation: str) -> None:
        super().__init__()
        widths = [d_in] + [hidden] * depth
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, d_out)
        self.act = GATE_ACTIVATIONS[activation]

    def hidden(self, x_BI: Tensor) -> Tensor:
        h_BJ = x_BI
        for layer in self.body:
            h_BJ = self.act(layer(h_BJ))
        return h_BJ


@dataclass
class AttentiveMixtureOutput:
    y_BO: Tensor  # mixture output
    probs_BE: Tensor  # p(e|x)
    scores_BE: Tensor  # s_e before the softmax (and before top-k masking)
    expert_out_BEO: Tensor  # every expert's output


class MLPMixture(nn.Module):
    """What the study's dense mixtures share: `num_experts` MLP experts and a gate trunk
    `act(G x + b)` of width J; each subclass adds its gate's read-out after these (the order the
    parameters are drawn in, so seeded runs stay reproducible)."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, hidden: int, *, expert_depth: int,
                 top_k: int | None, activation: str) -> None:
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(GATE_ACTIVATIONS)}, got {activation!r}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        self.top_k = top_k
        self.experts = nn.ModuleList(MLPExpert(d_in, d_out, hidden, expert_depth, activation)
                                     for _ in range(num_experts))
        self.gate_trunk = nn.Linear(d_in, hidden)
        self.act = GATE_ACTIVATIONS[activation]


class AttentiveMixture(MLPMixture):
    """Dense mixture of `num_experts` MLP experts under the paper's attentive gate."""

    def __init__(self, d_in: int, d_out: int, num_experts: int = 5, hidden: int = 32, *, expert_depth: int = 1,
                 top_k: int | None = None, activation: str = "relu") -> None:
        super().__init__(d_in, d_out, num_experts, hidden, expert_depth=expert_depth, top_k=top_k,
                         activation=activation)
        self.w_q = nn.Linear(hidden, hidden, bias=False)
        self.w_k = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x_BI: Tensor) -> AttentiveMixtureOutput:
        hidden_BEJ = torch.stack([expert.hidden(x_BI) for expert in self.experts], dim=1)
        out_BEO = torch.stack([expert.head(hidden_BEJ[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        scores_BE = attention_scores(self.w_q(self.act(self.gate_trunk(x_BI))), self.w_k(hidden_BEJ))
        probs_BE = masked_softmax(scores_BE, self.top_k)
        y_BO = torch.einsum("be,beo->bo", probs_BE, out_BEO)
        return AttentiveMixtureOutput(y_BO=y_BO, probs_BE=probs_BE, scores_BE=scores_BE, expert_out_BEO=out_BEO)
