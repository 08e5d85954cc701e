"""How precise a loss estimate is: the standard error of the mean loss over windows (sequences).

Tokens of one sequence are correlated (they share context), so the per-token spread over the
square root of the token count would overstate the precision; the sequences are the independent
draws. With n sequences whose mean losses have standard deviation s, the mean loss has standard
error s / sqrt(n): to halve it, evaluate four times the tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def standard_error(count: float, total: float, total_sq: float) -> float:
    """Standard error of the mean of `count` values with sum `total` and sum of squares
    `total_sq` (nan for fewer than two values)."""
    if count < 2:
        return float("nan")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / (count - 1)
    return math.sqrt(var / count)


def sequence_loss_sums(logits_BSV: torch.Tensor, targets_BS: torch.Tensor,
                       valid_BS: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [4]: tokens, sequences, and the sum and sum of squares of the sequences' mean
    losses, to be summed over batches and ranks (the mean of the sequence means is the mean
    loss: every sequence has S tokens). On the logits' device: no host read.
    `valid_BS` (False: padding): each sequence's mean is over its real positions, and a sequence
    without one is not counted."""
    nll_BS = F.cross_entropy(logits_BSV.float().transpose(1, 2), targets_BS, reduction="none")
    if valid_BS is not None:
        real_BS = valid_BS.to(torch.float64)
        counts_B = real_BS.sum(1)
        means_B = (nll_BS.double() * real_BS).sum(1) / counts_B.clamp_min(1.0)
        return torch.stack([counts_B.sum(), (counts_B > 0).double().sum(), means_B.sum(), means_B.square().sum()])
    means_B = nll_BS.double().mean(1)
    # Fills, not tensors built from host data: a copy to the device would wait for it.
    tokens = torch.full((), float(nll_BS.numel()), dtype=torch.float64, device=means_B.device)
    sequences = torch.full((), float(means_B.numel()), dtype=torch.float64, device=means_B.device)
    return torch.stack([tokens, sequences, means_B.sum(), means_B.square().sum()])
