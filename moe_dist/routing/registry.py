"""Router registry: `router.type` in a config selects a (config dataclass, router module) pair.

The built-in routers are listed here, in one table: the MoE layer builds routers only through
`build_router`, so adding a router is a module of its own plus a row below, never a change to
dispatch. `register_router` adds a router from outside the library (a research fork, a test).
"""

from __future__ import annotations

from typing import Any

from moe_dist.common.config import ConfigError, from_dict
from moe_dist.routing.attentive import AttentiveConfig, AttentiveRouter
from moe_dist.routing.base import Router, RouterConfig
from moe_dist.routing.fixed_projection import FixedProjectionConfig, FixedProjectionRouter
from moe_dist.routing.hash import HashRouter, HashRouterConfig
from moe_dist.routing.inhibition import InhibitionConfig, InhibitionRouter
from moe_dist.routing.topk import GROUP_KEYS, TopKRouter, TopKRouterConfig

BUILTIN_ROUTERS: dict[str, tuple[type[RouterConfig], type[Router]]] = {
    "topk": (TopKRouterConfig, TopKRouter),
    "inhibition": (InhibitionConfig, InhibitionRouter),
    "fixed_projection": (FixedProjectionConfig, FixedProjectionRouter),
    "attentive": (AttentiveConfig, AttentiveRouter),
    "hash": (HashRouterConfig, HashRouter),
}

_REGISTRY: dict[str, tuple[type[RouterConfig], type[Router]]] = dict(BUILTIN_ROUTERS)


def register_router(name: str, config_cls: type[RouterConfig], router_cls: type[Router]) -> None:
    """Make `router.type: name` build `router_cls` from a `config_cls` (a RouterConfig subclass)."""
    if name in _REGISTRY and _REGISTRY[name] != (config_cls, router_cls):
        raise ValueError(f"router type {name!r} registered twice")
    _REGISTRY[name] = (config_cls, router_cls)


def router_types() -> list[str]:
    return sorted(_REGISTRY)


def router_config_from_dict(data: dict[str, Any] | RouterConfig, where: str = "router") -> RouterConfig:
    if isinstance(data, RouterConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {data!r}")
    kind = data.get("type", "topk")
    if kind not in _REGISTRY:
        raise ConfigError(f"{where}.type must be one of {sorted(_REGISTRY)}, got {kind!r}")
    config_cls = _REGISTRY[kind][0]
    refused = [key for key in GROUP_KEYS if key in data and key not in config_cls.__dataclass_fields__]
    if refused:
        reason = getattr(config_cls, "group_limit_refusal", "it does not implement group-limited selection")
        raise ConfigError(f"{where}.{refused[0]} ({data[refused[0]]!r}): router type {kind!r} cannot limit "
                          f"expert groups: {reason}")
    return from_dict(config_cls, {**data, "type": kind}, f"{where}[{kind}]")


def build_router(cfg: RouterConfig, *, d_model: int, num_experts: int, top_k: int, layer_index: int) -> Router:
    return _REGISTRY[cfg.type][1](cfg, d_model=d_model, num_experts=num_experts, top_k=top_k,
                                  layer_index=layer_index)
