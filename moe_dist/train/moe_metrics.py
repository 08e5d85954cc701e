"""Routing statistics (docs/routers/statistics.md) accumulated over a logging interval or an
evaluation, on the device.

Legend: E experts, L domain labels.

Per micro batch every MoE layer returns this rank's own counts (detached, on the layer's device:
`tokens_per_expert`, `tokens_per_expert_kept`, `num_tokens`, `importance` and `entropy_token_sum`
for routers with probabilities, `expert_label_counts` with labels, unweighted losses `loss_<name>`,
the receive budget's `pairs_over_budget`, `pairs_spilled`, `pairs_budget_dropped` where it is on).
They are summed here on the device, without a host read. At the end of the interval all layers'
sums become one flat vector (`pack`) that travels in one all-reduce over the data-parallel ranks
together with whatever the caller packs beside it; `summarize` turns the global sums into every
layer's logged values on the device, and the caller reads them with one host read (`unpack`).

Counts are summed and the ratios recomputed from the sums (a mean of per-batch ratios would
weight small batches like large ones): entropy_token (H_s) = sum(entropy_token_sum) /
sum(num_tokens), entropy_mean (H_u) = H(sum(importance) / sum(num_tokens)), the load ratios and
I(expert; domain) from the summed loads and label table. Losses are the mean over micro batches
and ranks. A layer that gives an entropy only as a per-batch ratio (no `entropy_token_sum`) has
that ratio averaged the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_dist.moe.stats import entropy, mutual_information

# The receive budget's counts (moe/rank_budget.py): logged as totals over the interval and ranks.
BUDGET_COUNTS = ("pairs_over_budget", "pairs_spilled", "pairs_budget_dropped")

SUMMED = ("tokens_per_expert", "tokens_per_expert_kept", "num_tokens", "importance", "entropy_token_sum",
          "expert_label_counts", *BUDGET_COUNTS)
RATIOS = ("entropy_token",)  # averaged only where the sums they come from are missing


def _kept(name: str, stats: dict[str, Tensor]) -> bool:
    if name in SUMMED or name.startswith("loss_"):
        return True
    return name in RATIOS and f"{name}_sum" not in stats


class MoEStatsAccumulator:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[int, dict[str, Tensor]] = {}
        self.batches = 0
        self._summary_layout: list[tuple[int, list[str], int, int]] = []

    def add(self, moe_stats: dict[int, dict[str, Tensor]]) -> None:
        """One micro batch's `ModelOutput.moe_stats` (this rank's): summed on their device."""
        self.batches += 1
        for layer, stats in moe_stats.items():
            row = self.sums.setdefault(layer, {})
            for name, value in stats.items():
                if _kept(name, stats):
                    value = value.detach().to(torch.float64)
                    row[name] = value if name not in row else row[name] + value

    def _layout(self) -> list[tuple[int, str, torch.Size]]:
        # Sorted, so every rank packs the same layout (its layers and names are the same).
        return [(layer, name, self.sums[layer][name].shape)
                for layer in sorted(self.sums) for name in sorted(self.sums[layer])]

    def pack(self, device: torch.device | str | None = None) -> Tensor:
        """float64 [n]: every layer's sums, flat (empty without MoE layers), on `device` (default:
        where the sums are)."""
        parts = [self.sums[layer][name].reshape(-1) for layer, name, _ in self._layout()]
        if not parts:
            return torch.zeros(0, dtype=torch.float64, device=device)
        flat = torch.cat([p.to(parts[0].device) for p in parts])
        return flat if device is None else flat.to(device)

    def summarize(self, packed: Tensor, ranks: int = 1) -> Tensor:
        """The logged values of every layer, flat, on `packed`'s device, from `pack`'s vector summed
        over `ranks` ranks; `unpack` names them once read."""
        sums: dict[int, dict[str, Tensor]] = {}
        offset = 0
        for layer, name, shape in self._layout():
            n = math.prod(shape)
            sums.setdefault(layer, {})[name] = packed[offset:offset + n].view(shape)
            offset += n
        draws = max(self.batches, 1) * ranks  # micro batches of every rank
        parts: list[Tensor] = []
        self._summary_layout = []
        for layer, s in sums.items():
            load_E, kept_E = s["tokens_per_expert"], s["tokens_per_expert_kept"]
            total = load_E.sum().clamp_min(1.0)
            mean_load = load_E.mean().clamp_min(1e-12)
            values = {"dropped_fraction": 1.0 - kept_E.sum() / total, "load_cv": load_E.std(unbiased=False) / mean_load,
                      "load_max_over_mean": load_E.max() / mean_load, "entropy_load": entropy(load_E / total)}
            tokens = s.get("num_tokens")
            if "entropy_token_sum" in s and tokens is not None:
                values["entropy_token"] = s["entropy_token_sum"] / tokens.clamp_min(1.0)
            elif "entropy_token" in s:
                values["entropy_token"] = s["entropy_token"] / draws
            if "importance" in s:
                # Each token's probabilities sum to 1, so without num_tokens the importance's own
                # total is the token count.
                denominator = tokens if tokens is not None else s["importance"].sum()
                values["entropy_mean"] = entropy(s["importance"] / denominator.clamp_min(1e-12))
            for name in BUDGET_COUNTS:
                if name in s:
                    values[name] = s[name]
            for name in sorted(n for n in s if n.startswith("loss_")):
                values[name] = s[name] / draws
            joint_EL = s.get("expert_label_counts")
            if joint_EL is not None:
                mi, mi_norm = mutual_information(joint_EL)
                labelled = joint_EL.sum() > 0  # no labelled pair: no I(expert; domain) (nan -> None)
                values["mi_domain"] = torch.where(labelled, mi, torch.full_like(mi, math.nan))
                values["mi_domain_normalized"] = torch.where(labelled, mi_norm, torch.full_like(mi, math.nan))
            E = load_E.numel()
            L = 0 if joint_EL is None else joint_EL.shape[1]
            self._summary_layout.append((layer, list(values), E, L))
            parts += [torch.stack([v.reshape(()).to(torch.float64) for v in values.values()]), load_E.reshape(-1)]
            if joint_EL is not None:
                parts.append(joint_EL.reshape(-1))
        return torch.cat(parts) if parts else packed.new_zeros(0)

    def unpack(self, values: list[float]) -> dict[int, dict[str, Any]]:
        """`summarize`'s vector, read to the host (`.tolist()`), as rows per layer: floats (None for
        an undefined I(expert; domain)), `load_E` a list over experts and `expert_label_counts` a
        list of E rows of L counts."""
        out: dict[int, dict[str, Any]] = {}
        offset = 0
        for layer, names, E, L in self._summary_layout:
            row: dict[str, Any] = {}
            for name in names:
                value = values[offset]
                row[name] = None if name.startswith("mi_domain") and math.isnan(value) else value
                offset += 1
            row["load_E"] = values[offset:offset + E]
            offset += E
            if L:
                row["expert_label_counts"] = [values[offset + e * L:offset + (e + 1) * L] for e in range(E)]
                offset += E * L
            out[layer] = {k: v for k, v in row.items() if not (k.startswith("mi_domain") and v is None)}
        return out

    def summary(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
                ranks: int = 1) -> dict[int, dict[str, Any]]:
        """Pack, sum over ranks with `all_reduce_sum` (None: one process), summarize and read once."""
        packed = self.pack()
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        return self.unpack(self.summarize(packed, ranks).tolist())


def budget_line(step: int, summary: dict[int, dict[str, Any]]) -> str | None:
    """The receive budget's counts of the interval (moe.rank_capacity_factor; None without one):
    per MoE layer, pairs over budget / spilled / dropped, summed over micro batches and ranks."""
    cells = [f"{layer}: {int(row['pairs_over_budget'])}/{int(row['pairs_spilled'])}/"
             f"{int(row['pairs_budget_dropped'])}" for layer, row in summary.items() if "pairs_over_budget" in row]
    if not cells:
        return None
    return f"step {step} | receive budget, pairs over budget/spilled/dropped per MoE layer: {' '.join(cells)}"


def wants_step_load(routers) -> bool:
    """Whether any router's `after_step` reads the step's load (`Router.uses_step_load`: the
    aux-loss-free bias update, when on): only then does a step pay the all-reduce of its load."""
    return any(r.uses_step_load for r in routers)


def step_load(moe_stats_list: list[dict[int, dict[str, Tensor]]],
              all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[int, Tensor]:
    """Global pre-drop tokens per expert of one optimizer step, summed over its micro batches on
    the device and over the data-parallel ranks by one packed `all_reduce_sum` for all layers
    (None: one process): what each router's `after_step` hook receives. No host read."""
    load: dict[int, Tensor] = {}
    for moe_stats in moe_stats_list:
        for layer, stats in moe_stats.items():
            value = stats["tokens_per_expert"].detach()
            load[layer] = value if layer not in load else load[layer] + value
    if all_reduce_sum is None or not load:
        return load
    layers = sorted(load)
    packed = all_reduce_sum(torch.cat([load[layer].reshape(-1).to(torch.float64) for layer in layers]))
    out, offset = {}, 0
    for layer in layers:
        n = load[layer].numel()
        out[layer] = packed[offset:offset + n]
        offset += n
    return out
