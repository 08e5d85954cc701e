"""A hot expert at EP 2 (CPU/gloo, tools/bench/hot_expert_memory.py): under a receive budget the
hot rank receives at most P * B rows and its measured peak tensor memory stays at the balanced
run's, while the unbounded dropless layer's rows and peak grow with the hot expert. The same
through the real launcher (counts in the log, `error` exits): tests/e2e/test_fault_hot_expert.py."""

from __future__ import annotations

from tools.bench.hot_expert_memory import run

SHAPE = dict(tokens=256, d_model=64, d_ff=128, experts=8, top_k=2, cf=1.0)
BUDGET_ROWS = 2 * 256  # P * ceil(cf * T * K / P)


def test_the_budget_bounds_the_hot_ranks_rows_and_peak_memory():
    rows = run(SHAPE, [("unbounded", False), ("unbounded", True), ("drop", True), ("spill", True)])
    at = {(r["case"], r["routing"], r["rank"]): r for r in rows}
    balanced, hot = at["unbounded", "balanced", 0], at["unbounded", "hot", 0]
    # Expert 0 lives on rank 0: unbounded, the hot routing sends it far more than its fair share.
    assert hot["rows_received"] > 1.3 * BUDGET_ROWS
    assert hot["peak_tensor_mb"] > 1.2 * balanced["peak_tensor_mb"], (hot, balanced)
    for case in ("drop", "spill"):
        bounded = at[case, "hot", 0]
        assert bounded["rows_received"] <= BUDGET_ROWS and bounded["pairs_over_budget"] > 0, bounded
        assert bounded["peak_tensor_mb"] <= 1.02 * balanced["peak_tensor_mb"], (case, bounded, balanced)
        # Spill sends the overflow to rank 1's experts instead of dropping most of it.
        assert at[case, "hot", 1]["rows_received"] <= BUDGET_ROWS
    assert at["spill", "hot", 0]["pairs_spilled"] > at["spill", "hot", 0]["pairs_budget_dropped"]
    assert at["drop", "hot", 0]["pairs_spilled"] == 0
