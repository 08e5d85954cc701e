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


def token_nll(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """float32 [B, S]: each token's negative log-likelihood."""
    return F.cross_entropy(logits_BSV.float().transpose(1, 2), targets_BS, reduction="none")


def sequence_loss_sums(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, nll_BS: torch.Tensor | None = None,
                       valid_BS: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [4]: tokens, sequences, and the sum and sum of squares of the sequences' mean
    losses, to be summed over batches and ranks (the mean of the sequence means is the mean
    loss: every sequence has S tokens). On the logits' device: no host read. `nll_BS`: the
    tokens' losses where the caller has them already (token_nll).
    `valid_BS` (False: padding): each sequence's mean is over its real positions, and a sequence
    without one is not counted."""
    if nll_BS is None:
        nll_BS = token_nll(logits_BSV, targets_BS)
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


def domain_loss_sums(nll_BS: torch.Tensor, labels_BS: torch.Tensor, num_domains: int) -> torch.Tensor:
    """float64 [2, num_domains]: per domain, the summed token loss and the token count (tokens
    labelled -1 or >= num_domains count in none). A reduction over a one-hot table, not
    index_add_ (atomics on CUDA would add in a varying order); no host read."""
    labels = labels_BS.reshape(-1).to(nll_BS.device)
    onehot_QL = F.one_hot(torch.where((labels >= 0) & (labels < num_domains), labels, num_domains),
                          num_domains + 1)[:, :num_domains].to(torch.float64)
    return torch.stack([(nll_BS.reshape(-1, 1).double() * onehot_QL).sum(0), onehot_QL.sum(0)])
