"""Typed configuration of one MoE layer (strict: unknown keys and impossible values are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moe_dist.common.config import ConfigError, check, check_choice, check_int, from_dict
from moe_dist.kernels import BACKENDS
from moe_dist.moe.rank_budget import OVERFLOW_POLICIES, ROUTERS_WITHOUT_SCORES
from moe_dist.routing.base import RouterConfig
from moe_dist.routing.registry import router_config_from_dict

DROP_POLICIES = ("position", "probs")
# What a count-defined balance loss (switch, importance) averages over: docs/training.md,
# "Balance-loss scopes" (moe_dist/routing/losses.py computes each).
BALANCE_SCOPES = ("micro_batch", "dp_global", "sequence", "global_batch")
ACTIVATIONS = ("swiglu", "gelu")


@dataclass
class AuxLossConfig:
    """Coefficients of the routing losses added to the LM loss (0 disables a term's gradient;
    every term a router can produce is still computed and logged)."""

    switch: float = 0.01
    z_loss: float = 0.001
    importance: float = 0.0
    sample_similarity: float = 0.0
    # Tokens per rank on which sample_similarity's pairwise distances are computed.
    sample_similarity_tokens: int = 512
    # The tokens each balance loss's expert fractions (switch) or importances are taken over:
    # one of BALANCE_SCOPES. dp_global is the behaviour of runs before scopes existed.
    switch_scope: str = "dp_global"
    importance_scope: str = "dp_global"

    def __post_init__(self) -> None:
        for name in ("switch_scope", "importance_scope"):
            check_choice(f"aux_loss.{name}", getattr(self, name), BALANCE_SCOPES)
        for f in dataclasses.fields(self):
            if f.name.endswith("_scope"):
                continue
            value = getattr(self, f.name)
            check(isinstance(value, (int, float)) and value >= 0,
                  f"aux_loss.{f.name} must be a number >= 0, got {value!r}")
        check(self.sample_similarity_tokens >= 2,
              f"aux_loss.sample_similarity_tokens must be >= 2, got {self.sample_similarity_tokens}")

    def scopes(self) -> dict[str, str]:
        """The scope of each count-defined balance loss, by loss name."""
        return {"switch": self.switch_scope, "importance": self.importance_scope}

    def coefficients(self) -> dict[str, float]:
        return {"switch": self.switch, "z_loss": self.z_loss, "importance": self.importance,
                "sample_similarity": self.sample_similarity}


@dataclass
class MoEConfig:
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    # 0: no limit (as `dropless: true`); a negative value is refused as a likely typo.
    capacity_factor: float = 1.25
    # 0: no limit at eval, the function Hugging Face exports, tools/evaluate.py and generation
    # compute (docs/training.md, "Eval-time capacity"); a capacity here is an opt-in.
    eval_capacity_factor: float = 0.0
    min_capacity: int = 4
    drop_policy: str = "position"
    dropless: bool = False
    # Receive budget per (source rank, destination EP rank) in training: each rank sends each EP
    # rank at most ceil(cf * T * K / ep_size) rows (moe/rank_budget.py, docs/training.md "Bounded
    # dispatch"). 0: no budget.
    rank_capacity_factor: float = 0.0
    # What happens to a pair past the budget: drop (lowest weight first), spill (to the token's
    # next-ranked expert with room), error (stop the run).
    overflow: str = "drop"
    # Under spill: how many of the token's next-ranked experts a pair tries (at most E - K).
    spill_choices: int = 2
    activation: str = "swiglu"
    num_shared_experts: int = 0
    # Hidden width (per SwiGLU branch) of the one FFN that holds the shared experts. None:
    # d_ff * num_shared_experts (filled in when there are shared experts).
    shared_d_ff: int | None = None
    # Scale the shared experts' output by sigmoid(x @ w), w one [1, D] weight (Qwen2-MoE).
    shared_gate: bool = False
    router: RouterConfig = field(default_factory=lambda: router_config_from_dict({"type": "topk"}))
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    ep_size: int = 1
    init_std: float = 0.02
    expert_impl: str = "auto"  # the experts' GEMM backend: moe_dist.kernels.BACKENDS
    # COMET's neuron-level mask inside each expert (docs/routers/fixed_projection.md, "Neuron-level
    # COMET"): the fraction p_k of hidden
    # units a token keeps, chosen by a frozen projection of its input. None: no mask.
    comet_active_fraction: float | None = None
    # DeepSeek-V4's hash layers (docs/routers/hash.md): the model's first `hash_layers` MoE layers
    # route by `hash_router` (a `hash` router config; null: its defaults), the later ones by
    # `router`. Per layer: `for_moe_layer`.
    hash_layers: int = 0
    hash_router: RouterConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = router_config_from_dict(self.router, where="moe.router")
        if isinstance(self.hash_router, dict):
            self.hash_router = router_config_from_dict(self.hash_router, where="moe.hash_router")
        self._check_hash_layers()
        if isinstance(self.aux_loss, dict):
            self.aux_loss = from_dict(AuxLossConfig, self.aux_loss, "moe.aux_loss")
        for name in ("d_model", "d_ff", "num_experts", "top_k", "ep_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"moe.{name} must be an integer >= 1, got {value!r}")
        check(self.top_k <= self.num_experts,
              f"moe.top_k ({self.top_k}) must be <= moe.num_experts ({self.num_experts})")
        check(self.num_experts % self.ep_size == 0,
              f"moe.num_experts ({self.num_experts}) must be divisible by moe.ep_size ({self.ep_size})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                  f"moe.{name} must be a number >= 0, got {value!r}; 0 means no capacity limit (for a run "
                  f"that drops no token set moe.dropless: true)")
        check(isinstance(self.min_capacity, int) and self.min_capacity >= 0,
              f"moe.min_capacity must be an integer >= 0, got {self.min_capacity!r}")
        check(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
              f"moe.num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.num_shared_experts:
            if self.shared_d_ff is None:
                self.shared_d_ff = self.d_ff * self.num_shared_experts
            check_int("moe.shared_d_ff", self.shared_d_ff, 1)
        else:
            check(self.shared_d_ff is None,
                  f"moe.shared_d_ff ({self.shared_d_ff!r}) needs moe.num_shared_experts >= 1 (it is 0)")
        check(isinstance(self.shared_gate, bool), f"moe.shared_gate must be true or false, got {self.shared_gate!r}")
        check(not self.shared_gate or self.num_shared_experts >= 1,
              "moe.shared_gate needs a shared expert: set moe.num_shared_experts >= 1")
        check(self.init_std > 0, f"moe.init_std must be > 0, got {self.init_std!r}")
        check(self.comet_active_fraction is None or 0.0 < self.comet_active_fraction <= 1.0,
              f"moe.comet_active_fraction must be in (0, 1] or null, got {self.comet_active_fraction!r}")
        check_choice("moe.drop_policy", self.drop_policy, DROP_POLICIES)
        value = self.rank_capacity_factor
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
              f"moe.rank_capacity_factor must be a number >= 0 (0: no receive budget), got {value!r}")
        check_choice("moe.overflow", self.overflow, OVERFLOW_POLICIES)
        check_int("moe.spill_choices", self.spill_choices, 1)
        self._check_spill_router()
        check_choice("moe.activation", self.activation, ACTIVATIONS)
        check_choice("moe.expert_impl", self.expert_impl, BACKENDS)
        self.router.check_layer(self.num_experts, self.top_k)

    def _check_hash_layers(self) -> None:
        check(isinstance(self.hash_layers, int) and not isinstance(self.hash_layers, bool) and self.hash_layers >= 0,
              f"moe.hash_layers must be an integer >= 0, got {self.hash_layers!r}")
        if not self.hash_layers:
            check(self.hash_router is None,
                  "moe.hash_router is set but moe.hash_layers is 0: only hash layers use it; set "
                  "moe.hash_layers >= 1 or remove moe.hash_router")
            return
        check(self.router.type != "hash",
              f"moe.hash_layers ({self.hash_layers}) makes the first MoE layers hash layers, but moe.router is "
              f"already 'hash' on every MoE layer; set moe.hash_layers to 0 or give moe.router a learned router")
        if self.hash_router is None:
            self.hash_router = router_config_from_dict({"type": "hash"}, where="moe.hash_router")
        check(self.hash_router.type == "hash",
              f"moe.hash_router.type must be 'hash', got {self.hash_router.type!r}")

    def for_moe_layer(self, ordinal: int) -> "MoEConfig":
        """The config of the model's `ordinal`-th MoE layer (0: the first): `hash_router` for the first
        `hash_layers` of them, this config unchanged after them."""
        if ordinal >= self.hash_layers:
            return self
        return dataclasses.replace(self, router=self.hash_router, hash_layers=0, hash_router=None)

    def _check_spill_router(self) -> None:
        check(not (self.rank_capacity_factor and self.overflow == "spill"
                   and self.router.type in ROUTERS_WITHOUT_SCORES),
              f"moe.overflow 'spill' needs a router that ranks every expert (probabilities over all of them); "
              f"moe.router.type {self.router.type!r} gives none: set moe.overflow to 'drop' or 'error'")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "moe") -> "MoEConfig":
        data = dict(data)
        # Router configs are polymorphic on `type`: parsed by the router registry, not generically.
        router = data.pop("router", None)
        hash_router = data.pop("hash_router", None)
        if router is not None:
            data["router"] = router_config_from_dict(router, where=f"{where}.router")
        if hash_router is not None:
            data["hash_router"] = router_config_from_dict(hash_router, where=f"{where}.hash_router")
        return from_dict(cls, data, where)


__all__ = ["MoEConfig", "AuxLossConfig", "ConfigError", "BALANCE_SCOPES"]
