"""Sample-similarity regularizer L_s: paper form against literal sums, production form against the
paper form, subsampling determinism and per-rank groups."""

import itertools

import pytest
import torch

from moe_dist.routing.regularizers import normalized_distances, sample_similarity_loss, subsample
from moe_dist.study.sample_similarity_paper import sample_similarity_paper


def batch(B=24, E=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    logits = torch.randn(B, E, generator=g).requires_grad_()
    return x, logits


def test_paper_form_equals_its_literal_sums():
    x, logits = batch(B=5, E=3)
    p = torch.softmax(logits, -1).detach()
    dist = torch.cdist(x, x)
    dist = dist / dist.max()
    B, E = p.shape
    same = sum(p[i, e] * p[j, e] * dist[i, j] for e in range(E) for i in range(B) for j in range(B)) / E
    different = sum(p[i, e] * p[j, f] * dist[i, j]
                    for e, f in itertools.permutations(range(E), 2) for i in range(B) for j in range(B)) / (E * E - E)
    expected = 0.7 * same - 0.3 * different / B**2
    torch.testing.assert_close(sample_similarity_paper(p, x, beta_s=0.7, beta_d=0.3), expected)


@pytest.mark.parametrize("beta_s,beta_d", [(1e-6, 1e-6), (1.0, 0.5), (0.0, 2.0)])
def test_paper_and_production_forms_agree_up_to_the_affine_relation(beta_s, beta_d):
    # L_paper = a * Sigma * L_prod + b, a = beta_s/E + beta_d/(B^2 E(E-1)), b = -beta_d Sigma/(B^2 E(E-1)).
    x, logits = batch()
    B, E = logits.shape
    sigma = normalized_distances(x).sum()
    a = beta_s / E + beta_d / (B**2 * E * (E - 1))
    b = -beta_d * sigma / (B**2 * E * (E - 1))

    paper = sample_similarity_paper(torch.softmax(logits, -1), x, beta_s, beta_d)
    (grad_paper,) = torch.autograd.grad(paper, logits)
    production = sample_similarity_loss(torch.softmax(logits, -1), x, num_tokens=512)
    (grad_production,) = torch.autograd.grad(production, logits)

    torch.testing.assert_close(paper, a * sigma * production + b)
    torch.testing.assert_close(grad_paper, a * sigma * grad_production)


def test_production_form_is_one_at_collapse_and_zero_when_every_token_has_its_own_expert():
    x, _ = batch(B=4, E=4)
    collapsed = torch.zeros(4, 4)
    collapsed[:, 2] = 1.0
    assert float(sample_similarity_loss(collapsed, x)) == pytest.approx(1.0)
    assert float(sample_similarity_loss(torch.eye(4), x)) == 0.0  # only i == j pairs, D_ii = 0


def test_default_subsample_depends_on_the_token_count_only_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = subsample(100, 16)
    assert torch.equal(first, subsample(100, 16))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.unique().numel() == 16 and int(first.max()) < 100
    assert not torch.equal(first, subsample(101, 16)[:16])
    assert subsample(16, 16) is None  # every token used
    seeded = subsample(100, 16, torch.Generator().manual_seed(7))
    assert not torch.equal(seeded, first)


def test_production_form_uses_exactly_the_subsampled_tokens():
    x, logits = batch(B=40)
    probs = torch.softmax(logits, -1)
    pick = subsample(40, 12)
    torch.testing.assert_close(sample_similarity_loss(probs, x, num_tokens=12),
                               sample_similarity_loss(probs[pick], x[pick], num_tokens=12))


def test_groups_give_the_mean_of_per_rank_losses_in_value_and_gradient():
    x, logits = batch(B=48)
    grouped = sample_similarity_loss(torch.softmax(logits, -1), x, num_tokens=16, num_groups=3)
    (grad_grouped,) = torch.autograd.grad(grouped, logits)
    per_rank = torch.stack([sample_similarity_loss(torch.softmax(logits[r * 16:(r + 1) * 16], -1),
                                                   x[r * 16:(r + 1) * 16], num_tokens=16)
                            for r in range(3)]).mean()
    (grad_per_rank,) = torch.autograd.grad(per_rank, logits)
    torch.testing.assert_close(grouped, per_rank)
    torch.testing.assert_close(grad_grouped, grad_per_rank)
    with pytest.raises(ValueError, match=r"num_groups \(5\) must divide the number of tokens \(48\)"):
        sample_similarity_loss(torch.softmax(logits, -1), x, num_groups=5)
