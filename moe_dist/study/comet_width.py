"""COMET width sweep on digits (docs/routing_study.md, "3. COMET MLP width sweep on digits"; Shaier
et al., arXiv 2410.08003): a one-hidden-layer MLP of width w, dense, vs a smaller dense MLP of width
p_k * w (the same number of active units), vs the same width-w MLP whose hidden units are gated by
COMET's fixed mask `kwta_{p_k}(V x)` (`moe_dist.study.comet_ffn.CometMask`, V frozen). The paper
reports that COMET's advantage over a dense MLP grows with width (widths 100-3000, p_k 0.1/0.5/0.9).

Legend: B inputs, I pixels, F hidden units, O classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.common.seeding import init_generator
from moe_dist.routing.comet import FFN_MASK_KEY, active_units
from moe_dist.study.comet_ffn import CometMask
from moe_dist.study.digits_data import NUM_CLASSES, NUM_PIXELS, digits_split, minibatch_indices
from moe_dist.study.seeds import seed_stats
from moe_dist.study.tasks import Task

MODELS = ("dense", "smaller dense", "comet")


@dataclass(frozen=True)
class CometWidthBudget:
    widths: tuple[int, ...] = (32, 128, 512, 2048)
    active_fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3


FULL = CometWidthBudget()
QUICK = CometWidthBudget(widths=(16, 64), active_fractions=(0.5,), seeds=(0,), steps=3)


class MaskedMLP(nn.Module):
    """`x -> relu(x W1 + b1) [* mask] -> W2`; without a mask a plain dense MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(NUM_PIXELS, width)
        self.out = nn.Linear(width, NUM_CLASSES)

    def forward(self, x_BI: Tensor, mask_BF: Tensor | None = None) -> Tensor:
        h_BF = F.relu(self.hidden(x_BI))
        return self.out(h_BF if mask_BF is None else h_BF * mask_BF)


def hidden_width(model: str, width: int, active_fraction: float) -> int:
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return active_units(width, active_fraction) if model == "smaller dense" else width


def run_one(model: str, width: int, active_fraction: float, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    b = CometWidthBudget(**budget)
    data = digits_split(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MaskedMLP(hidden_width(model, width, active_fraction))
    mask_train_BF = mask_test_BF = None
    if model == "comet":
        # V is frozen and the inputs are fixed images, so each image's mask is computed once
        # (the same values as computing it every step, without a k-WTA per batch).
        comet = CometMask(NUM_PIXELS, width, active_fraction, init_generator(seed, 0, FFN_MASK_KEY))
        mask_train_BF, mask_test_BF = comet(data.x_train_BI), comet(data.x_test_BI)
    opt = torch.optim.Adam(net.parameters(), lr=b.lr)
    g = torch.Generator().manual_seed(seed)
    for idx in minibatch_indices(len(data.y_train_B), b.batch_size, b.steps, g):
        mask_BF = None if mask_train_BF is None else mask_train_BF[idx]
        loss = F.cross_entropy(net(data.x_train_BI[idx], mask_BF), data.y_train_B[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = float((net(data.x_test_BI, mask_test_BF).argmax(-1) != data.y_test_B).float().mean())
    return {"model": model, "width": width, "active_fraction": active_fraction, "seed": seed, "test_error": error}


def configurations(budget: CometWidthBudget) -> list[tuple[str, int, float]]:
    """(model, width, p_k); the dense MLP has no p_k (recorded as 1.0)."""
    configs = [("dense", w, 1.0) for w in budget.widths]
    configs += [(m, w, p) for m in ("smaller dense", "comet") for w in budget.widths for p in budget.active_fractions]
    return configs


def tasks(budget: CometWidthBudget) -> list[Task]:
    return [Task("comet_width", f"{m} w={w} p_k={p} seed={seed}", run_one,
                 dict(model=m, width=w, active_fraction=p, seed=seed, budget=asdict(budget)),
                 budget.steps * budget.batch_size * (1 + w / 256) / 110_000)  # ~seconds on one busy core
            for m, w, p in configurations(budget) for seed in budget.seeds]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{"widths", "active_fractions", "curves": {"dense": [stats per width], "comet p_k=0.5": ...}}."""
    widths = sorted({r["width"] for r in records})
    fractions = sorted({r["active_fraction"] for r in records if r["model"] != "dense"})

    def curve(model: str, p: float) -> list[dict[str, float]]:
        return [seed_stats([r["test_error"] for r in records
                            if (r["model"], r["width"], r["active_fraction"]) == (model, w, p)]) for w in widths]

    curves = {"dense": curve("dense", 1.0)}
    for m in ("smaller dense", "comet"):
        curves.update({f"{m} p_k={p:g}": curve(m, p) for p in fractions})
    return {"widths": widths, "active_fractions": fractions, "curves": curves}
