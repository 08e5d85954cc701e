"""Neuron-level COMET (docs/routers/fixed_projection.md, "Neuron-level COMET"): k-WTA, the frozen
mask, a dense CometFFN, masks inside experts."""

import pytest
import torch

from moe_dist.common.seeding import init_generator
from moe_dist.moe.expert_mask import expert_mask_projections, mask_expert_hidden
from moe_dist.moe.experts import ffn_activation
from moe_dist.routing.comet import kwta_mask
from moe_dist.study.comet_ffn import CometFFN, CometMask


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.argsort().argsort().float() for t in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_kwta_keeps_exactly_k_winners_even_when_scores_tie():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [1.0, 1.0, 1.0, 1.0]])
    mask = kwta_mask(scores, 2)
    assert mask[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert mask.sum(1).tolist() == [2.0, 2.0]


def test_mask_projection_is_a_frozen_buffer_drawn_from_the_seed():
    a = CometMask(8, 20, 0.25, init_generator(3, 1))
    b = CometMask(8, 20, 0.25, init_generator(3, 1))
    assert list(a.parameters()) == [] and "v_FD" in a.state_dict()
    assert torch.equal(a.v_FD, b.v_FD)
    assert float(a.v_FD.abs().max()) <= 8 ** -0.5  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert a.k == 5 and a(torch.randn(6, 8)).sum(1).tolist() == [5.0] * 6


def test_mask_overlap_rises_with_input_similarity():
    g = torch.Generator().manual_seed(0)
    mask = CometMask(32, 256, 0.1, init_generator(0, 0))
    x1 = torch.randn(300, 32, generator=g)
    angle = torch.rand(300, 1, generator=g) * torch.pi / 2
    x2 = torch.cos(angle) * x1 + torch.sin(angle) * torch.randn(300, 32, generator=g)
    similarity = torch.cosine_similarity(x1, x2, dim=1)
    overlap = (mask(x1) * mask(x2)).sum(1) / mask.k
    assert spearman(similarity, overlap) > 0.5


def test_almost_no_unit_is_never_active():
    mask = CometMask(32, 256, 0.1, init_generator(1, 0))
    ever_active = mask(torch.randn(2000, 32, generator=torch.Generator().manual_seed(1))).amax(0)
    assert float(1.0 - ever_active.mean()) < 0.01


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_comet_ffn_masks_the_hidden_units_and_never_the_output(activation):
    ffn = CometFFN(8, 24, activation, active_fraction=0.25, init_std=0.5, seed=2, layer_index=1)
    assert {name for name, _ in ffn.named_parameters()} == {"w_in_DI", "w_out_FD"}
    x = torch.randn(5, 8)
    m = kwta_mask(x @ ffn.mask.v_FD.t(), 6)
    expected = (ffn_activation(x @ ffn.w_in_DI, activation) * m) @ ffn.w_out_FD
    torch.testing.assert_close(ffn(x), expected)
    # One token: its inactive units' input weights get no gradient.
    ffn(x[:1]).sum().backward()
    inactive = m[0] == 0
    grad = ffn.w_in_DI.grad if activation == "gelu" else ffn.w_in_DI.grad.view(8, 2, 24).sum(1)
    assert float(grad[:, inactive].abs().max()) == 0.0
    assert float(grad[:, ~inactive].abs().max()) > 0.0


def test_expert_masks_match_per_expert_kwta_and_do_not_depend_on_ep_size():
    kw = dict(d_model=8, d_ff=16, seed=4, layer_index=2)
    all4 = expert_mask_projections(4, 0, **kw)
    assert torch.equal(expert_mask_projections(2, 2, **kw), all4[2:])
    counts = [3, 0, 5, 2]
    u = torch.randn(10, 8)
    h = torch.randn(10, 16)
    out = mask_expert_hidden(h, u, all4, counts, k=4)
    start = 0
    for j, n in enumerate(counts):
        rows = slice(start, start + n)
        torch.testing.assert_close(out[rows], h[rows] * kwta_mask(u[rows] @ all4[j], 4))
        start += n
    assert ((out != 0).sum(1) == 4).all()
