"""Common-mode synthetic test (docs/routing_study.md, "1. Common-mode synthetic"): does a
component shared by every token spoil routing, and does inhibition (or centring a fixed
projection) undo it?

Legend: T tokens, D width, E experts (moe_dist/moe/__init__.py's letters); the clusters are
spelled out, since K there is the experts chosen per token.

Data: `num_clusters` unit-norm cluster centres, a within-cluster offset of norm `offset_norm`,
and one shared vector of norm S (a random unit direction times S) added to every token. The task
is a small MoE regressor: the target is a cluster-specific linear map of the token's offset, so
the best routing gives each cluster its own expert. One `MoELayer` (top-1, as many experts as
clusters) is fitted by AdamW with the layer's default aux losses; routers with no trainable
parameters still run the same loop (their experts train, and a centring statistic adapts). Measured on fresh held-out tokens in eval mode
with the layer's own statistics: I(expert; cluster) / H(cluster), load CV, dropped fraction, at the
training capacity factor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.study.seeds import seed_stats
from moe_dist.study.tasks import Task

# Every router at its shipped defaults; only what the arm is about is set.
ARMS: dict[str, dict[str, Any]] = {
    "topk": {"type": "topk"},
    "inhibition subtractive": {"type": "inhibition", "mode": "subtractive"},
    "inhibition divisive": {"type": "inhibition", "mode": "divisive"},
    "inhibition rectified": {"type": "inhibition", "mode": "rectified"},
    "inhibition subspace": {"type": "inhibition", "mode": "subspace"},
    "fixed_projection": {"type": "fixed_projection"},
    "fixed_projection center": {"type": "fixed_projection", "center": True},
}
METRICS = ("mi_label_normalized", "load_cv", "dropped_fraction", "eval_mse")


@dataclass(frozen=True)
class CommonModeBudget:
    shared_norms: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_clusters: int = 8  # = num_experts: one expert per cluster is the ideal routing
    d_model: int = 32
    d_ff: int = 32
    offset_norm: float = 0.5
    steps: int = 150
    batch_tokens: int = 512
    eval_tokens: int = 4096
    lr: float = 1e-2
    capacity_factor: float = 1.25


FULL = CommonModeBudget()
QUICK = CommonModeBudget(shared_norms=(0.0, 4.0), seeds=(0,), steps=3, batch_tokens=64, eval_tokens=256)


@dataclass(frozen=True)
class Geometry:
    cluster_centers: Tensor  # [clusters, D]
    shared_D: Tensor  # unit direction of the common mode
    cluster_maps: Tensor  # per-cluster target maps, [clusters, D, D]


def make_geometry(seed: int, num_clusters: int, width: int) -> Geometry:
    g = torch.Generator().manual_seed(seed)
    return Geometry(cluster_centers=F.normalize(torch.randn(num_clusters, width, generator=g), dim=1),
                    shared_D=F.normalize(torch.randn(width, generator=g), dim=0),
                    cluster_maps=torch.randn(num_clusters, width, width, generator=g) / math.sqrt(width))


def sample_tokens(geo: Geometry, num_tokens: int, shared_norm: float, offset_norm: float,
                  g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_TD, target_TD, cluster_T). Tokens are RMS-normalised like a pre-norm's output (which
    rescales each token but keeps the common mode), so experts see inputs of one scale at
    every S and any degradation is the router's."""
    num_clusters, D = geo.cluster_centers.shape
    cluster_T = torch.randint(num_clusters, (num_tokens,), generator=g)
    offset_TD = torch.randn(num_tokens, D, generator=g) * (offset_norm / math.sqrt(D))
    raw_TD = geo.cluster_centers[cluster_T] + offset_TD + shared_norm * geo.shared_D
    x_TD = raw_TD * torch.rsqrt(raw_TD.square().mean(-1, keepdim=True))
    target_TD = torch.einsum("tij,tj->ti", geo.cluster_maps[cluster_T], x_TD)
    return x_TD, target_TD, cluster_T


def layer_config(budget: CommonModeBudget, router: dict[str, Any]) -> MoEConfig:
    cf = budget.capacity_factor  # eval at the training factor: the drops training would see
    return MoEConfig.from_dict(dict(d_model=budget.d_model, d_ff=budget.d_ff, num_experts=budget.num_clusters,
                                    top_k=1, capacity_factor=cf, eval_capacity_factor=cf, router=router))


def run_one(arm: str, shared_norm: float, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    """Fit one layer for one (router, S, seed) and measure its routing on held-out tokens."""
    b = CommonModeBudget(**budget)
    geo = make_geometry(seed, b.num_clusters, b.d_model)
    layer = MoELayer(layer_config(b, ARMS[arm]), seed=seed)
    opt = torch.optim.AdamW(layer.parameters(), lr=b.lr)
    g = torch.Generator().manual_seed(seed + 1_000)  # data stream apart from the geometry's
    for _ in range(b.steps):
        x_TD, target_TD, _ = sample_tokens(geo, b.batch_tokens, shared_norm, b.offset_norm, g)
        out = layer(x_TD)
        loss = F.mse_loss(out.y, target_TD)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        layer.router.after_step(out.stats["tokens_per_expert"])
    layer.eval()
    x_TD, target_TD, cluster_T = sample_tokens(geo, b.eval_tokens, shared_norm, b.offset_norm, g)
    with torch.no_grad():
        out = layer(x_TD, MoESideInputs(labels_T=cluster_T, num_labels=b.num_clusters))
    return {"arm": arm, "shared_norm": shared_norm, "seed": seed,
            "mi_label_normalized": float(out.stats["mi_label_normalized"]),
            "load_cv": float(out.stats["load_cv"]),
            "dropped_fraction": float(out.stats["dropped_fraction"]),
            "eval_mse": float(F.mse_loss(out.y, target_TD))}


def tasks(budget: CommonModeBudget) -> list[Task]:
    cost = budget.steps * budget.batch_tokens / 40_000  # ~seconds on one busy core
    return [Task("common_mode", f"{arm} S={s:g} seed={seed}", run_one,
                 dict(arm=arm, shared_norm=s, seed=seed, budget=asdict(budget)), cost)
            for arm in ARMS for s in budget.shared_norms for seed in budget.seeds]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{arm: {metric: [stats per shared norm]}} plus the norms, in the order they were run."""
    norms = sorted({r["shared_norm"] for r in records})
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    table: dict[str, Any] = {}
    for arm in arms:
        table[arm] = {m: [seed_stats([r[m] for r in records if r["arm"] == arm and r["shared_norm"] == s])
                          for s in norms] for m in METRICS}
    return {"shared_norms": norms, "arms": table}
