"""Digits: the original softmax gate vs the attentive gate, each alone, + L_s (sample similarity)
or + importance, 5 experts, dense mixture and top-1/top-2 (docs/routing_study.md, "2. Digits";
Krishnamurthy et al., arXiv 2302.14703, on MNIST).

Legend: B inputs, I pixels, O classes, E experts.

The mixture is the classic one of probabilities, `p(y|x) = sum_e p(e|x) softmax(out_e)_y`,
trained on its negative log-likelihood by Adam. Top-k is the paper's masking (every score but the
k largest to -inf before the softmax); with top-1 the chosen weight is then always 1 and the task
loss gives the gate no gradient, so only a regularizer can move it. The regularizers see the
unmasked distribution `softmax(s)` (they would have no gradient through a one-hot top-1 mask):
L_s in the paper's two-term form with the paper's MNIST coefficients and batch size (512), the
importance loss with Shazeer et al.'s coefficient 0.1. Measured on the test split, from the
distribution the mixture uses: error, I(first-choice expert; class) / H(class), mean per-input
gate entropy H_s, entropy of the mean gate distribution H_u (collapsed: H_u < 0.5 nats).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moe_dist.moe.stats import entropy, expert_label_counts, mutual_information
from moe_dist.routing.losses import importance_cv2
from moe_dist.study.attentive_mixture import AttentiveMixture
from moe_dist.study.digits_data import NUM_CLASSES, NUM_PIXELS, digits_split, minibatch_indices
from moe_dist.study.sample_similarity_paper import sample_similarity_paper
from moe_dist.study.seeds import seed_stats
from moe_dist.study.softmax_mixture import SoftmaxGateMixture
from moe_dist.study.tasks import Task

GATES = {"softmax": SoftmaxGateMixture, "attentive": AttentiveMixture}
REGULARIZERS = ("none", "sample_similarity", "importance")
ROUTINGS = {"dense": None, "top-1": 1, "top-2": 2}
METRICS = ("test_error", "mi_label_normalized", "entropy_token", "entropy_mean")


@dataclass(frozen=True)
class DigitsGatesBudget:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_experts: int = 5
    hidden: int = 32  # h of the paper's MNIST setup
    steps: int = 250
    batch_size: int = 512
    lr: float = 3e-3
    beta_s: float = 1e-6  # L_s coefficients of the paper (MNIST, batch 512)
    beta_d: float = 1e-6
    importance: float = 0.1
    collapse_below: float = 0.5  # H_u in nats


FULL = DigitsGatesBudget()
QUICK = DigitsGatesBudget(seeds=(0,), steps=3)


def arm_name(gate: str, regularizer: str) -> str:
    return gate if regularizer == "none" else f"{gate} + {regularizer}"


def mixture_nll(out_BEO: Tensor, probs_BE: Tensor, y_B: Tensor) -> Tensor:
    """`-mean log sum_e p_e softmax(out_e)_y`; masked experts (p = 0) drop out of the sum."""
    log_py_BE = torch.log_softmax(out_BEO, dim=-1).gather(2, y_B[:, None, None].expand(-1, out_BEO.shape[1], 1))[..., 0]
    return -torch.logsumexp(torch.log(probs_BE.clamp_min(1e-30)) + log_py_BE, dim=1).mean()


def regularizer_loss(name: str, scores_BE: Tensor, x_BI: Tensor, b: DigitsGatesBudget) -> Tensor | None:
    probs_BE = torch.softmax(scores_BE, dim=-1)
    if name == "sample_similarity":
        return sample_similarity_paper(probs_BE, x_BI, b.beta_s, b.beta_d)
    if name == "importance":
        return b.importance * importance_cv2(probs_BE, probs_BE.sum(0).detach(), dp_size=1)
    return None


def gate_metrics(probs_BE: Tensor, y_B: Tensor) -> dict[str, float]:
    first_B1 = probs_BE.argmax(-1, keepdim=True)
    _, mi_normalized = mutual_information(expert_label_counts(first_B1, y_B, probs_BE.shape[1], NUM_CLASSES))
    return {"mi_label_normalized": float(mi_normalized),
            "entropy_token": float(entropy(probs_BE).mean()),
            "entropy_mean": float(entropy(probs_BE.mean(0)))}


def run_one(gate: str, regularizer: str, routing: str, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    b = DigitsGatesBudget(**budget)
    data = digits_split(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GATES[gate](NUM_PIXELS, NUM_CLASSES, b.num_experts, b.hidden, top_k=ROUTINGS[routing])
    opt = torch.optim.Adam(model.parameters(), lr=b.lr)
    g = torch.Generator().manual_seed(seed)
    for idx in minibatch_indices(len(data.y_train_B), b.batch_size, b.steps, g):
        x_BI, y_B = data.x_train_BI[idx], data.y_train_B[idx]
        out = model(x_BI)
        loss = mixture_nll(out.expert_out_BEO, out.probs_BE, y_B)
        reg = regularizer_loss(regularizer, out.scores_BE, x_BI, b)
        if reg is not None:
            loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(data.x_test_BI)
        p_yx_BO = torch.einsum("be,beo->bo", out.probs_BE, torch.softmax(out.expert_out_BEO, dim=-1))
        error = float((p_yx_BO.argmax(-1) != data.y_test_B).float().mean())
        metrics = gate_metrics(out.probs_BE, data.y_test_B)
    return {"gate": gate, "regularizer": regularizer, "routing": routing, "seed": seed, "test_error": error,
            **metrics, "collapsed": metrics["entropy_mean"] < b.collapse_below}


def tasks(budget: DigitsGatesBudget) -> list[Task]:
    cost = budget.steps * budget.batch_size / 25_000  # ~seconds on one busy core
    return [Task("digits_gates", f"{arm_name(gate, reg)} {routing} seed={seed}", run_one,
                 dict(gate=gate, regularizer=reg, routing=routing, seed=seed, budget=asdict(budget)), cost)
            for routing in ROUTINGS for gate in GATES for reg in REGULARIZERS for seed in budget.seeds]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{routing: {arm: {metric: stats, "collapsed": count, "seeds": n}}}."""
    table: dict[str, Any] = {}
    for routing in ROUTINGS:
        table[routing] = {}
        for gate in GATES:
            for reg in REGULARIZERS:
                rows = [r for r in records if (r["routing"], r["gate"], r["regularizer"]) == (routing, gate, reg)]
                if rows:
                    table[routing][arm_name(gate, reg)] = {
                        **{m: seed_stats([r[m] for r in rows]) for m in METRICS},
                        "collapsed": sum(r["collapsed"] for r in rows), "seeds": len(rows)}
    return table
