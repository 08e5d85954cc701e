"""The trainer's per-domain validation sums (moe_dist/evaluate/precision.py, domain_loss_sums):
each domain's summed token loss and token count, unlabelled tokens (-1) and labels past
num_domains in none; the same on every call order (a one-hot reduction, no atomics)."""

from __future__ import annotations

import torch

from moe_dist.evaluate.precision import domain_loss_sums, sequence_loss_sums, token_nll


def test_masked_sums_per_domain():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels = torch.tensor([[0, 0, 2], [-1, 2, 5]])
    sums = domain_loss_sums(nll, labels, 3)
    assert sums.dtype == torch.float64 and sums.shape == (2, 3)
    assert sums[0].tolist() == [3.0, 0.0, 8.0]  # losses: domain 0 = 1 + 2, domain 2 = 3 + 5
    assert sums[1].tolist() == [2.0, 0.0, 2.0]  # tokens; -1 and 5 count nowhere


def test_domain_sums_add_up_to_the_sequence_sums_when_every_token_is_labelled():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    labels = torch.randint(0, 4, (3, 5))
    nll = token_nll(logits, targets)
    per_domain = domain_loss_sums(nll, labels, 4)
    tokens, sequences, loss_sum, _ = sequence_loss_sums(logits, targets, nll).tolist()
    assert per_domain[1].sum().item() == tokens == 15
    # every sequence has S tokens: the token-weighted mean of the domains is the mean loss
    assert abs(per_domain[0].sum().item() / tokens - loss_sum / sequences) < 1e-12
    assert torch.equal(sequence_loss_sums(logits, targets), sequence_loss_sums(logits, targets, nll))
