"""Capacity and slot assignment against hand-computed expectations."""

import pytest
import torch

from moe_dist.moe.capacity import assign_slots, expert_capacity


def test_capacity_formula_and_limits():
    assert expert_capacity(100, 8, 2, 1.25, 4) == 32  # ceil(1.25*100*2/8) = ceil(31.25)
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4  # ceil(1.25) = 2 < min_capacity 4
    assert expert_capacity(3, 2, 2, 4.0, 0) == 3  # ceil(12) capped at T: no token picks twice
    assert expert_capacity(100, 8, 2, 0.0, 4) is None  # cf <= 0: no limit
    assert expert_capacity(100, 8, 2, 1.25, 4, dropless=True) is None


def test_position_policy_serves_first_choices_before_second_choices():
    # 4 tokens, k=2, 3 experts. Expert 0 is the first choice of t2, t3 and second choice of t0, t1.
    idx = torch.tensor([[1, 0], [2, 0], [0, 1], [0, 2]])
    plan = assign_slots(idx, 3, capacity=2, policy="position")
    # Expert 0's queue: t2 (k0), t3 (k0), t0 (k1), t1 (k1) -> slots 0, 1, 2, 3.
    assert plan.slot_TK.tolist() == [[0, 2], [0, 3], [0, 1], [1, 1]]
    assert plan.keep_TK.tolist() == [[True, False], [True, False], [True, True], [True, True]]
    assert plan.load_E.tolist() == [4, 2, 2]
    assert plan.kept_E.tolist() == [2, 2, 2]


def test_probs_policy_keeps_highest_weights():
    idx = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.3]])
    plan = assign_slots(idx, 2, capacity=2, policy="probs", priority_TK=w)
    assert plan.slot_TK[:, 0].tolist() == [2, 0, 1, 0]
    assert plan.keep_TK[:, 0].tolist() == [False, True, True, True]


def test_probs_policy_ties_fall_back_to_position_order():
    idx = torch.tensor([[0, 1], [1, 0]])
    w = torch.full((2, 2), 0.5)
    plan = assign_slots(idx, 2, capacity=1, policy="probs", priority_TK=w)
    # Equal weights: first choices (t0->0, t1->1) win over second choices.
    assert plan.keep_TK.tolist() == [[True, False], [True, False]]


def test_expert_with_zero_tokens_and_min_capacity():
    idx = torch.tensor([[0], [0], [0], [2]])
    cap = expert_capacity(4, 3, 1, 0.5, min_capacity=2)  # ceil(0.67)=1 -> min_capacity 2
    plan = assign_slots(idx, 3, capacity=cap)
    assert cap == 2
    assert plan.load_E.tolist() == [3, 0, 1]
    assert plan.kept_E.tolist() == [2, 0, 1]
    assert plan.keep_TK[:, 0].tolist() == [True, True, False, True]


def test_everything_dropped_with_zero_capacity():
    idx = torch.tensor([[0, 1], [1, 0]])
    plan = assign_slots(idx, 2, capacity=0)
    assert not plan.keep_TK.any()
    assert plan.kept_E.tolist() == [0, 0]
    assert plan.load_E.tolist() == [2, 2]


def test_capacity_larger_than_tokens_keeps_everything():
    idx = torch.randint(0, 4, (16, 1))
    plan = assign_slots(idx, 4, capacity=expert_capacity(16, 4, 1, 100.0, 0))
    assert plan.keep_TK.all()
    assert plan.kept_E.tolist() == plan.load_E.tolist()


def test_dropless_keeps_everything_and_slots_count_up():
    idx = torch.zeros(5, 1, dtype=torch.long)
    plan = assign_slots(idx, 2, capacity=None)
    assert plan.keep_TK.all()
    assert plan.slot_TK[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_groups_have_separate_queues():
    # Two groups of 2 tokens, all to expert 0, capacity 1: the first token of each group is kept.
    idx = torch.zeros(4, 1, dtype=torch.long)
    plan = assign_slots(idx, 2, capacity=1, num_groups=2)
    assert plan.keep_TK[:, 0].tolist() == [True, False, True, False]
    assert plan.slot_TK[:, 0].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide the number of tokens \(4\)"):
        assign_slots(idx, 2, capacity=1, num_groups=3)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="'random'"):
        assign_slots(torch.zeros(2, 1, dtype=torch.long), 2, 1, policy="random")
