"""The original MoE gate as the attentive gate's baseline: the same MLP experts and gate trunk
as `AttentiveMixture`, but the gate is a plain softmax over a linear read-out of the trunk,
`p(e|x) = softmax(W_g act(G x + b))`, instead of query-key attention (this study's choice of
"original gate": a trunk of the same width keeps the comparison about attention, not depth).

Legend: B inputs, I input width, O output width, E experts, J gate/expert hidden width (moe_dist/moe/__init__.py's J).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_dist.study.attentive_mixture import AttentiveMixtureOutput, MLPMixture, masked_softmax


class SoftmaxGateMixture(MLPMixture):
    def __init__(self, d_in: int, d_out: int, num_experts: int = 5, hidden: int = 32, *, expert_depth: int = 1,
                 top_k: int | None = None, activation: str = "relu") -> None:
        super().__init__(d_in, d_out, num_experts, hidden, expert_depth=expert_depth, top_k=top_k,
                         activation=activation)
        self.gate_out = nn.Linear(hidden, num_experts)

    def forward(self, x_BI: Tensor) -> AttentiveMixtureOutput:
        out_BEO = torch.stack([expert.head(expert.hidden(x_BI)) for expert in self.experts], dim=1)
        scores_BE = self.gate_out(self.act(self.gate_trunk(x_BI)))
        probs_BE = masked_softmax(scores_BE, self.top_k)
        y_BO = torch.einsum("be,beo->bo", probs_BE, out_BEO)
        return AttentiveMixtureOutput(y_BO=y_BO, probs_BE=probs_BE, scores_BE=scores_BE, expert_out_BEO=out_BEO)
