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

import torch

from moe_dist.parallel import runtime
from moe_dist.train.safety.exits import NONFINITE, RunStopped

LM, GRAD, AUX = 1, 2, 4  # mask bits; MoE layer i of the model's MoE layers: bit 3 + i


def _not_finite(x) -> torch.Tensor:
    """0-dim bool on `x`'s device: no host read (a grad norm that is a Python float becomes a
    0-dim tensor by a fill, not a copy)."""
    t = x if isinstance(x, torch.Tensor) else torch.full((), float(x), dtype=torch.float64)
    return torch.isfinite(t.detach()).logical_not().reshape(())


class NonFiniteWatch:
    """Flags kept on the device: one column per mask bit (LM, GRAD, AUX, then each MoE layer),
    OR-ed over the micro batches of a step, so watching costs no host read; the step's flags
    travel in the guard's one per-step row and are read with it."""

    def __init__(self, moe_layer_ids: list[int], max_consecutive: int) -> None:
        self.layer_column = {layer: 3 + i for i, layer in enumerate(moe_layer_ids)}
        self.layer_bit = {layer: 1 << column for layer, column in self.layer_column.items()}
        self.columns = 3 + len(moe_layer_ids)
        self.max_consecutive = max_consecutive
        self.flags: torch.Tensor | None = None
        self.consecutive = 0
        self.skipped = 0

    def observe(self, out) -> None:
        """One micro batch's `ModelOutput` on this rank."""
        lm = out.lm_loss.detach()
        columns = [_not_finite(lm)] + [torch.zeros((), dtype=torch.bool, device=lm.device)] * (self.columns - 1)
        columns[2] = _not_finite(out.aux_loss).to(lm.device)
        for layer, stats in out.moe_stats.items():
            losses = [v.detach().reshape(()) for name, v in stats.items() if name.startswith("loss_")]
            if losses:
                bad = torch.isfinite(torch.stack(losses)).all().logical_not().to(lm.device)
                column = self.layer_column.get(layer, 2)
                columns[column] = columns[column] | bad
        flags = torch.stack(columns)
        self.flags = flags if self.flags is None else self.flags | flags.to(self.flags.device)

    def take_flags(self, grad_norm, step_applied: bool, device: torch.device | None = None) -> torch.Tensor:
        """This rank's flags for the step just taken as a float64 vector on the device (one
        column per mask bit); resets them for the next one. `grad_norm`: DeepSpeed's (a tensor, a
        float or None)."""
        flags = self.flags
        if flags is None:
            flags = torch.zeros(self.columns, dtype=torch.bool, device=device)
        elif device is not None:
            flags = flags.to(device)
        grad = torch.zeros((), dtype=torch.bool, device=flags.device) if grad_norm is None else \
            _not_finite(grad_norm).to(flags.device)
        if not step_applied:
            grad = torch.ones_like(grad)
        flags = torch.cat([flags[:1], (flags[1] | grad).reshape(1), flags[2:]])
        self.flags = None
        return flags.to(torch.float64)

    def mask(self, flags: list[float]) -> int:
        """The mask bits of one rank's flag columns (read from the per-step row)."""
        return sum(1 << i for i, flag in enumerate(flags) if flag)

    def take_mask(self, grad_norm, step_applied: bool) -> int:
        """`take_flags` read on the host (one read; the trainer reads them in the per-step row)."""
        return self.mask(self.take_flags(grad_norm, step_applied).tolist())

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
    """Names of the non-finite parameters, with one host read for all of them."""
    named = list(module.named_parameters())
    if not named:
        return []
    device = named[0][1].device
    bad = torch.stack([torch.isfinite(p.detach()).all().logical_not().to(device) for _, p in named]).tolist()
    return [name for (name, _), flag in zip(named, bad) if flag]


def refuse_nonfinite_save(module: torch.nn.Module, step: int) -> None:
    """Collective: raise RunStopped on every rank if any rank holds a non-finite parameter (its
    experts are its own), so no rank starts a save the others skip."""
    bad = nonfinite_parameters(module)
    counts = runtime.all_gather_row(torch.full((1,), float(len(bad)), dtype=torch.float64))[:, 0].tolist()
    if any(counts):
        ranks = [r for r, n in enumerate(counts) if n]
        mine = f"; here (rank {runtime.rank()}): {', '.join(bad[:5])}" if bad else ""
        raise RunStopped(NONFINITE, f"step {step}: not saving a checkpoint: parameters not finite on "
                                    f"rank(s) {ranks}{mine}; `latest` stays on the previous checkpoint")
