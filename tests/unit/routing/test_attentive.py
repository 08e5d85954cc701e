"""Attentive gate (docs/routers/attentive.md): hand-computed probabilities for the paper's dense
form and the expert-parallel probe form, training paths, and distillation into a plain topk router."""

import math

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.registry import build_router, router_config_from_dict
from moe_dist.study.attentive_mixture import AttentiveMixture
from moe_dist.study.distill import fit_topk_router, route_frozen_experts, top1_agreement

X = torch.tensor([[1.0, 2.0]])
EYE = torch.eye(2)
# With g(x) = relu(x) = [1, 2], probes/hidden layers h_0 = [1, 0], h_1 = [0, 2] and W_q = W_k = I:
# s = [q.h_0, q.h_1] / sqrt(2) = [1, 4] / sqrt(2).
S0, S1 = 1 / math.sqrt(2), 4 / math.sqrt(2)
P1 = math.exp(S1) / (math.exp(S0) + math.exp(S1))
FIRST_UNIT, SECOND_UNIT = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])


def hand_set_mixture(top_k=None) -> AttentiveMixture:
    mix = AttentiveMixture(2, 1, num_experts=2, hidden=2, top_k=top_k)
    with torch.no_grad():
        mix.gate_trunk.weight.copy_(EYE)
        mix.gate_trunk.bias.zero_()
        mix.w_q.weight.copy_(EYE)
        mix.w_k.weight.copy_(EYE)
        for expert, w, head in zip(mix.experts, (FIRST_UNIT, SECOND_UNIT), ([1.0, 0.0], [0.0, 1.0])):
            expert.body[0].weight.copy_(w)
            expert.body[0].bias.zero_()
            expert.head.weight.copy_(torch.tensor([head]))
            expert.head.bias.zero_()
    return mix


def test_dense_gate_probabilities_equal_the_hand_computed_example():
    out = hand_set_mixture()(X)
    torch.testing.assert_close(out.scores_BE, torch.tensor([[S0, S1]]))
    torch.testing.assert_close(out.probs_BE, torch.tensor([[1 - P1, P1]]))
    # Expert outputs: h_0[0] = 1 and h_1[1] = 2.
    torch.testing.assert_close(out.y_BO, torch.tensor([[(1 - P1) * 1.0 + P1 * 2.0]]))


def test_dense_gate_query_projection_is_applied():
    mix = hand_set_mixture()
    with torch.no_grad():
        mix.w_q.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # q = [2, 1]: s = [2, 2] / sqrt(2)
    torch.testing.assert_close(mix(X).probs_BE, torch.tensor([[0.5, 0.5]]))


def test_dense_top_k_variant_masks_before_the_softmax():
    out = hand_set_mixture(top_k=1)(X)
    torch.testing.assert_close(out.probs_BE, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out.y_BO, torch.tensor([[2.0]]))
    three = AttentiveMixture(4, 3, num_experts=3, hidden=4, top_k=2)(torch.randn(5, 4))
    assert ((three.probs_BE > 0).sum(1) == 2).all()


def test_dense_mixture_trains_gate_and_experts_end_to_end():
    mix = AttentiveMixture(6, 3, num_experts=5, hidden=8)
    mix(torch.randn(10, 6)).y_BO.square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in mix.parameters())
    assert mix.w_q.bias is None and mix.w_k.bias is None


def make_router(**cfg):
    torch.manual_seed(0)
    return build_router(router_config_from_dict({"type": "attentive", **cfg}), d_model=2, num_experts=2,
                        top_k=1, layer_index=0)


def test_expert_parallel_router_with_probes_equals_the_hand_computed_example():
    router = make_router(hidden=2)
    with torch.no_grad():
        router.gate_trunk.weight.copy_(EYE)
        router.gate_trunk.bias.zero_()
        router.w_q.weight.copy_(EYE)
        router.w_k.weight.copy_(EYE)
        router.probes_EJD.copy_(torch.stack([FIRST_UNIT, SECOND_UNIT]))
    route = router(X, RoutingContext(training=False))
    torch.testing.assert_close(route.logits_TE, torch.tensor([[S0, S1]]))
    torch.testing.assert_close(route.probs_TE, torch.tensor([[1 - P1, P1]]))
    assert route.idx_TK.tolist() == [[1]]
    torch.testing.assert_close(route.w_TK, torch.tensor([[P1]]))
    assert make_router(hidden=2, renormalize=True)(X, RoutingContext(training=False)).w_TK.tolist() == [[1.0]]


def test_expert_parallel_router_trains_every_gate_part_through_the_layer():
    cfg = MoEConfig.from_dict(dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router={"type": "attentive", "hidden": 4},
                                   aux_loss=dict(switch=0.0, z_loss=0.0)))
    layer = MoELayer(cfg)
    assert layer.router.probes_EJD.shape == (4, 4, 8)  # E * h * d probe parameters
    layer(torch.randn(20, 8)).y.sum().backward()
    for name, p in layer.router.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("bad,message", [
    (dict(hidden=0), r"router.hidden must be an integer >= 1, got 0"),
    (dict(activation="sigmoid"), r"router.activation must be one of .*got 'sigmoid'"),
])
def test_config_errors_name_the_value(bad, message):
    with pytest.raises(ConfigError, match=message):
        router_config_from_dict({"type": "attentive", **bad})


def clusters(n, seed):
    """8-d inputs around 4 centres, label = centre."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2.0
    labels = torch.randint(4, (n,), generator=g)
    return centres[labels] + 0.5 * torch.randn(n, 8, generator=g), labels


def test_distilled_topk_router_reproduces_the_trained_teachers_top1_choices():
    torch.manual_seed(0)
    teacher = AttentiveMixture(8, 4, num_experts=5, hidden=16)
    x, y = clusters(1024, seed=1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(teacher(x).y_BO, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}

    student = fit_topk_router(teacher, x, steps=300)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), f"distillation changed the teacher's {k}"
    held_out, _ = clusters(512, seed=2)
    assert top1_agreement(student, teacher, held_out) > 0.9


def test_distilled_mixture_combines_the_teachers_experts_with_the_router_choices():
    teacher = AttentiveMixture(8, 3, num_experts=5, hidden=8)
    x, _ = clusters(16, seed=3)
    student = fit_topk_router(teacher, x, top_k=2, steps=5)
    route = student(x, RoutingContext(training=False))
    experts = teacher(x).expert_out_BEO
    expected = torch.stack([sum(route.w_TK[b, j] * experts[b, route.idx_TK[b, j]] for j in range(2))
                            for b in range(16)])
    torch.testing.assert_close(route_frozen_experts(student, teacher, x), expected)
