"""The non-finite policy (docs/reliability.md): a step whose LM loss, aux loss (per MoE layer) or
gradient norm is not finite on any rank is skipped, named and counted; `max_consecutive_skips`
skips in a row stop the run (exit 3); weights that are not finite are never saved.

How the skip happens under DeepSpeed: ZeRO-1/2 (0.19.8) checks the reduced gradients for inf/NaN
before every optimizer step (all-reduced over data parallel ranks), and on overflow zeroes them,
leaves the weights, Adam state and LR scheduler as they were and reports the step as not applied
(`engine.was_step_applied()`, grad norm inf). A non-finite loss on any rank makes every dense
gradient non-finite (the data-parallel mean includes it), so DeepSpeed skips exactly the steps
this policy flags. The policy adds what DeepSpeed leaves out: the flag is agreed by all ranks
(one all-reduced report per step), the warning says which rank saw what, the LR schedule advances
with the step count (so a skip costs the step's data, not a shift of the whole schedule, and a
resume continues it exactly), and the run stops instead of skipping for ever. If DeepSpeed ever
applied a step this policy flags, the weights may already be poisoned: the run stops at once.

Finite loss spikes (lr=1000 drives the weights to ~5e11 before anything is non-finite) are not a
stop reason: they often recover, and the gradient norm goes non-finite soon after when not.
"""

from __future__ import annotations

import math

import torch

from moe_dist.parallel import runtime
from moe_dist.train.safety.exits import NONFINITE, RunStopped

LM, GRAD, AUX = 1, 2, 4  # mask bits; MoE layer i of the model's MoE layers: bit 3 + i


def _finite(x) -> bool:
    return math.isfinite(float(x))


class NonFiniteWatch:
    def __init__(self, moe_layer_ids: list[int], max_consecutive: int) -> None:
        self.layer_bit = {layer: 1 << (3 + i) for i, layer in enumerate(moe_layer_ids)}
        self.max_consecutive = max_consecutive
        self.mask = 0
        self.consecutive = 0
        self.skipped = 0

    def observe(self, out) -> None:
        """One micro batch's `ModelOutput` on this rank."""
        if not _finite(out.lm_loss.detach()):
            self.mask |= LM
        if not _finite(out.aux_loss.detach()):
            self.mask |= AUX
        for layer, stats in out.moe_stats.items():
            if any(name.startswith("loss_") and not _finite(value) for name, value in stats.items()):
                self.mask |= self.layer_bit.get(layer, AUX)

    def take_mask(self, grad_norm: float | None, step_applied: bool) -> int:
        """This rank's flags for the step just taken; resets them for the next one."""
        mask = self.mask | (GRAD if not step_applied or (grad_norm is not None and not _finite(grad_norm)) else 0)
        self.mask = 0
        return mask

    def describe(self, mask: int) -> list[str]:
        what = []
        if mask & LM:
            what.append("LM loss")
        if mask & GRAD:
            what.append("gradient norm")
        layers = [f"aux loss of MoE layer {layer}" for layer, bit in self.layer_bit.items() if mask & bit]
        if mask & AUX and not layers:
            layers.append("aux loss")
        return what + layers

    def after_step(self, step: int, masks: list[int], step_applied: bool) -> str | None:
        """Every rank's mask for `step` (identical on all ranks) -> the warning if the step was
        skipped, else None. Raises RunStopped when the run must stop."""
        if not any(masks):
            self.consecutive = 0
            return None
        detail = "; ".join(f"rank {r}: {', '.join(self.describe(m))}" for r, m in enumerate(masks) if m)
        if step_applied:
            raise RunStopped(NONFINITE, f"step {step}: non-finite values ({detail}) but the optimizer "
                                        f"applied the step; stopping without a checkpoint")
        self.skipped += 1
        self.consecutive += 1
        message = (f"step {step}: skipped the optimizer step, not finite: {detail} "
                   f"({self.consecutive} in a row, {self.skipped} skipped in all)")
        if self.consecutive >= self.max_consecutive:
            raise RunStopped(NONFINITE, f"{message}; stopping: train.max_consecutive_skips is "
                                        f"{self.max_consecutive}. The last committed checkpoint is "
                                        f"the last one with finite weights")
        return message


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def refuse_nonfinite_save(module: torch.nn.Module, step: int) -> None:
    """Collective: raise RunStopped on every rank if any rank holds a non-finite parameter (its
    experts are its own), so no rank starts a save the others skip."""
    bad = nonfinite_parameters(module)
    counts = runtime.all_gather_row(torch.tensor([float(len(bad))]))[:, 0].tolist()
    if any(counts):
        ranks = [r for r, n in enumerate(counts) if n]
        mine = f"; here (rank {runtime.rank()}): {', '.join(bad[:5])}" if bad else ""
        raise RunStopped(NONFINITE, f"step {step}: not saving a checkpoint: parameters not finite on "
                                    f"rank(s) {ranks}{mine}; `latest` stays on the previous checkpoint")
