"""Routing statistics (docs/routers/statistics.md) accumulated over a logging interval or an
evaluation.

Legend: E experts, L domain labels.

Per micro batch every MoE layer returns global statistics (already all-reduced over data
parallel ranks). Counts are summed over the interval and the ratios recomputed from the sums (a
mean of per-batch ratios would weight small batches like large ones); per-batch scalars
(entropies, aux losses) are averaged.
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor

from moe_dist.moe.stats import interval_summary

SUMMED = ("tokens_per_expert", "tokens_per_expert_kept", "expert_label_counts")
AVERAGED = ("entropy_token", "entropy_mean")


class MoEStatsAccumulator:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[int, dict[str, Tensor]] = defaultdict(dict)
        self.means: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.batches = 0

    def add(self, moe_stats: dict[int, dict[str, Tensor]]) -> None:
        self.batches += 1
        for layer, stats in moe_stats.items():
            for name, value in stats.items():
                if name in SUMMED:
                    value = value.detach().float().cpu()
                    prev = self.sums[layer].get(name)
                    self.sums[layer][name] = value if prev is None else prev + value
                elif name in AVERAGED or name.startswith("loss_"):
                    self.means[layer][name] += float(value)

    def summary(self) -> dict[int, dict[str, Tensor | float]]:
        """Per layer: load_E, `moe.stats.interval_summary`'s dropped_fraction, load_cv,
        load_max_over_mean and entropy_load, the averaged entropies and losses, and (with labels)
        the label table `expert_label_counts` with mi_domain and mi_domain_normalized."""
        out: dict[int, dict[str, Tensor | float]] = {}
        for layer, sums in self.sums.items():
            load_E = sums["tokens_per_expert"]
            joint_EL = sums.get("expert_label_counts")
            summary = interval_summary(load_E, sums["tokens_per_expert_kept"], joint_EL)
            row: dict[str, Tensor | float] = {
                "load_E": load_E, "dropped_fraction": summary.dropped_fraction, "load_cv": summary.load_cv,
                "load_max_over_mean": summary.load_max_over_mean, "entropy_load": summary.entropy_load,
            }
            for name, total in self.means[layer].items():
                row[name] = total / max(self.batches, 1)
            if joint_EL is not None:
                row["expert_label_counts"] = joint_EL
                if summary.mi_domain is not None:
                    row["mi_domain"], row["mi_domain_normalized"] = summary.mi_domain, summary.mi_domain_normalized
            out[layer] = row
        return out


def step_load(moe_stats_list: list[dict[int, dict[str, Tensor]]]) -> dict[int, Tensor]:
    """Global pre-drop tokens per expert of one optimizer step (summed over its micro batches):
    what each router's `after_step` hook receives."""
    load: dict[int, Tensor] = {}
    for moe_stats in moe_stats_list:
        for layer, stats in moe_stats.items():
            value = stats["tokens_per_expert"].detach()
            load[layer] = value if layer not in load else load[layer] + value
    return load
