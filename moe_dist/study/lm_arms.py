"""The arms of the study's language-model experiment (docs/routing_study.md, "4. MoE language
model"): each one a router plus the MoE-level settings it trains with, so that an arm that differs
in its balance losses, their scope or its dispatch is one line here, like one that differs in its
router.

Every arm shares the model, the tokens and the expert shapes (`LanguageModelBudget`), so the
active FLOPs per token differ only by the router's own work, which each run measures
(`language_model.router_cost`) and the page reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# `moe:` keys a budget owns: an arm that overrode them would no longer have equal compute.
BUDGET_KEYS = frozenset({"d_model", "d_ff", "num_experts", "top_k"})


@dataclass(frozen=True)
class Arm:
    """`router`: the `moe.router` section (None: the dense baseline, no MoE layer); `moe`: other
    `moe:` keys merged over the layer defaults, e.g. {"aux_loss": {"switch": 0.0}}; both are
    checked by `moe_dist.model.parse_model_config` when a run builds its model."""

    router: dict[str, Any] | None
    moe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.router is None and self.moe:
            raise ValueError(f"the dense arm has no MoE layer to apply moe overrides {self.moe} to")
        if self.router is not None and "type" not in self.router:
            raise ValueError(f"an arm's router needs a type, got {self.router}")
        owned = sorted(BUDGET_KEYS & set(self.moe))
        if owned:
            raise ValueError(f"moe keys {owned} are set by the budget for every arm (equal compute), not per arm")
        if "router" in self.moe:
            raise ValueError("put the router in Arm.router, not in Arm.moe")

    @property
    def router_type(self) -> str | None:
        return None if self.router is None else self.router["type"]


# The topk settings the strongest baselines share (issue 27: renormalized K weights), under the
# arms that isolate one other setting against them.
_STRONG_TOPK = {"type": "topk", "renormalize": True}

ARMS: dict[str, Arm] = {
    "dense": Arm(None),
    # topk unnormalized (the K weights sum to about K/E; the default before this study decided
    # `renormalize`), and the two stronger topk baselines the research routers are judged against.
    "topk": Arm({"type": "topk", "renormalize": False}),
    "topk renormalize": Arm(dict(_STRONG_TOPK)),
    # DeepSeek-V3's aux-loss-free balancing replaces the Switch loss; renormalized as there.
    "topk bias-balanced": Arm({"type": "topk", "renormalize": True, "bias_balancing": True},
                              {"aux_loss": {"switch": 0.0}}),
    # Inhibition at its other defaults (subtractive, EMA), with topk's K weights unnormalized as
    # `topk` above: the arm the study ran before the renormalize default changed.
    "inhibition": Arm({"type": "inhibition", "renormalize": False}),
    # The common-mode experiment's best mode after subtractive (docs/routing_study.md, section 1):
    # of divisive, rectified and subspace, divisive keeps I(expert; cluster) highest at its worst S.
    "inhibition divisive": Arm({"type": "inhibition", "mode": "divisive", "renormalize": False}),
    "fixed_projection": Arm({"type": "fixed_projection"}),
    "fixed_projection center": Arm({"type": "fixed_projection", "center": True}),
    "attentive": Arm({"type": "attentive"}),
    # The non-learned baseline beside COMET's fixed projection: a seeded token-id table.
    "hash": Arm({"type": "hash"}),
    # Issue 22's balance scope: the Switch loss's expert fractions over the optimizer step's micro
    # batches so far (the study loop hands the running counts on as the trainer does). Its
    # micro-batch twin is "topk renormalize": its default dp_global scope spans the one rank of a
    # single process, which is micro_batch (equal losses and gradients, tests/unit/study), so a
    # second run of it would cost CPU for the same numbers.
    "topk global-batch balance": Arm(dict(_STRONG_TOPK), {"aux_loss": {"switch_scope": "global_batch"}}),
    # The bounded dispatch's overflow policies: a receive budget of 1.25 times each stand-in rank's
    # fair share (`LanguageModelBudget.budget_ranks`; 1.25 is the capacity factor the other arms
    # train with) in front of dropless experts, the setting the budget exists for. Behind the
    # per-expert capacity of 1.25 a rank's experts could never receive more than the budget, so
    # it would never bind. Only `overflow` differs between the two.
    "topk budget drop": Arm(dict(_STRONG_TOPK), {"capacity_factor": 0.0, "rank_capacity_factor": 1.25,
                                                 "overflow": "drop"}),
    "topk budget spill": Arm(dict(_STRONG_TOPK), {"capacity_factor": 0.0, "rank_capacity_factor": 1.25,
                                                  "overflow": "spill"}),
}

# The strongest-topk candidates every research router is judged against (`claims.strongest_topk`):
# the arms above that change the routing loss or the dispatch answer their own claims, against
# one of these, with fewer seeds.
BASELINE_CANDIDATES = ("topk", "topk renormalize", "topk bias-balanced")
# (global-batch arm, its micro-batch twin) and (spill arm, drop arm): each pair differs in one setting.
SCOPE_PAIR = ("topk global-batch balance", "topk renormalize")
OVERFLOW_PAIR = ("topk budget spill", "topk budget drop")
