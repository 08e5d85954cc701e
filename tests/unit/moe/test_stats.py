"""`moe.stats.interval_summary`: the ratios of a log interval's or an evaluation's summed counts,
against values worked out by hand."""

import math

import pytest
import torch

from moe_dist.moe.stats import interval_summary, mutual_information


def test_load_ratios_by_hand():
    # 12 routed pairs, 8 kept; mean load 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    load_E = torch.tensor([1.0, 2.0, 3.0, 6.0])
    kept_E = torch.tensor([1.0, 2.0, 3.0, 2.0])
    s = interval_summary(load_E, kept_E)
    assert s.dropped_fraction == pytest.approx(4 / 12)
    assert s.load_cv == pytest.approx(math.sqrt(3.5) / 3)  # not the n - 1 std's sqrt(14 / 3) / 3
    assert s.load_max_over_mean == pytest.approx(6 / 3)
    assert s.entropy_load == pytest.approx(-sum(c / 12 * math.log(c / 12) for c in (1, 2, 3, 6)))
    assert s.mi_domain is None and s.mi_domain_normalized is None


def test_mutual_information_by_hand():
    # p(e, l) = [[1/2, 0], [1/4, 1/4]]: p(e) = [1/2, 1/2], p(l) = [3/4, 1/4]
    joint_EL = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    s = interval_summary(torch.tensor([2.0, 2.0], dtype=torch.float64),
                         torch.tensor([2.0, 2.0], dtype=torch.float64), joint_EL)
    mi = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    h_L = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s.mi_domain == pytest.approx(mi)
    assert s.mi_domain_normalized == pytest.approx(mi / h_L)
    assert s.dropped_fraction == 0.0 and s.load_cv == 0.0 and s.load_max_over_mean == 1.0


def test_mutual_information_extremes():
    load_E = torch.tensor([10.0, 10.0])
    determined = interval_summary(load_E, load_E, torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    assert determined.mi_domain == pytest.approx(math.log(2))
    assert determined.mi_domain_normalized == pytest.approx(1.0)
    independent = interval_summary(load_E, load_E, torch.tensor([[5.0, 5.0], [5.0, 5.0]]))
    assert independent.mi_domain == pytest.approx(0.0, abs=1e-7)
    one_label = interval_summary(load_E, load_E, torch.tensor([[10.0, 0.0], [10.0, 0.0]]))
    assert one_label.mi_domain == pytest.approx(0.0, abs=1e-7) and one_label.mi_domain_normalized == 0.0


def test_empty_counts():
    """An interval without routed pairs or without labelled ones: no division by zero, no MI."""
    zero_E = torch.zeros(3)
    s = interval_summary(zero_E, zero_E, torch.zeros(3, 2))
    assert (s.load_cv, s.load_max_over_mean, s.entropy_load) == (0.0, 0.0, 0.0)
    assert s.dropped_fraction == 1.0  # 1 - kept / max(routed, 1): nothing kept reads as all dropped
    assert s.mi_domain is None


def test_normalized_mi_without_a_host_branch():
    """route_statistics calls mutual_information in every labelled forward: one label (H = 0)
    gives 0, the same value the former Python branch did."""
    mi, mi_norm = mutual_information(torch.tensor([[3.0, 0.0], [1.0, 0.0]]))
    assert float(mi) == pytest.approx(0.0, abs=1e-7) and float(mi_norm) == 0.0
