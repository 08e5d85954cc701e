"""Distillation of a trained dense attentive gate into a plain `topk` router
(docs/routers/attentive.md, "Math": distillation).

Legend: B inputs, I input width, O output width, E experts, K experts per token.

The attentive gate needs every expert's hidden layer, so it cannot route before an expert-
parallel dispatch; a linear `topk` router can. With the teacher's experts frozen, the student
router is fitted to the teacher's gate distribution (cross-entropy to softmax(s), i.e. KL up to
the teacher's entropy), then routes for those experts in place of the teacher's gate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.routing.base import RoutingContext
from moe_dist.routing.registry import build_router
from moe_dist.routing.topk import TopKRouter, TopKRouterConfig
from moe_dist.study.attentive_mixture import AttentiveMixture


@torch.no_grad()
def teacher_distribution(teacher: AttentiveMixture, x_BI: Tensor) -> Tensor:
    """The teacher's unmasked gate distribution `softmax(s)`: also the target of a top-k teacher,
    since its masked probabilities throw away the ranking below the k-th expert."""
    return torch.softmax(teacher(x_BI).scores_BE, dim=-1)


def fit_topk_router(teacher: AttentiveMixture, x_BI: Tensor, *, top_k: int = 1, steps: int = 300,
                    lr: float = 0.05, batch_size: int = 256, seed: int = 0) -> TopKRouter:
    """A `topk` router over the teacher's input, trained by Adam on minibatches of `x_BI` to
    match the teacher's gate. The teacher (experts included) is only read, never updated."""
    target_BE = teacher_distribution(teacher, x_BI)
    num_experts = target_BE.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_router(TopKRouterConfig(), d_model=x_BI.shape[1], num_experts=num_experts,
                               top_k=top_k, layer_index=0)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(x_BI.shape[0], (min(batch_size, x_BI.shape[0]),), generator=g)
        log_q_BE = torch.log_softmax(student.gate(x_BI[pick]), dim=-1)
        loss = -(target_BE[pick] * log_q_BE).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


@torch.no_grad()
def top1_agreement(router: TopKRouter, teacher: AttentiveMixture, x_BI: Tensor) -> float:
    """Fraction of inputs whose first choice is the teacher's highest-scoring expert."""
    student_B = router(x_BI, RoutingContext(training=False)).idx_TK[:, 0]
    return float((student_B == teacher(x_BI).scores_BE.argmax(-1)).float().mean())


def route_frozen_experts(router: TopKRouter, teacher: AttentiveMixture, x_BI: Tensor) -> Tensor:
    """The distilled mixture: `y = sum_k w_k y_{idx_k}(x)` with the router's choices and the
    teacher's experts (evaluated densely here; an MoE layer would dispatch instead)."""
    route = router(x_BI, RoutingContext(training=router.training))
    out_BEO = teacher(x_BI).expert_out_BEO
    chosen_BKO = out_BEO.gather(1, route.idx_TK[..., None].expand(-1, -1, out_BEO.shape[-1]))
    return torch.einsum("bk,bko->bo", route.w_TK.to(chosen_BKO.dtype), chosen_BKO)
