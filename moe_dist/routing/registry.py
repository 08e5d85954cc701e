"""Router registry: `router.type` in a config selects a (config dataclass, router module) pair.

A router module's file registers itself with `@register_router("name", ConfigCls)`; the MoE
layer builds routers only through `build_router`, so adding a router never touches dispatch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from moe_dist.config_base import ConfigError, from_dict


@dataclass
class RouterConfig:
    """Fields every router config has; each router subclasses it with its own fields."""

    type: str = "topk"


_REGISTRY: dict[str, tuple[type[RouterConfig], type]] = {}

# Modules that register the built-in routers; imported lazily to keep import order free of cycles.
_BUILTIN_MODULES = (
    "moe_dist.routing.topk",
    "moe_dist.routing.inhibition",
    "moe_dist.routing.fixed_projection",
    "moe_dist.routing.attentive",
)


def register_router(name: str, config_cls: type[RouterConfig]) -> Callable[[type], type]:
    def wrap(router_cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][1] is not router_cls:
            raise ValueError(f"router type {name!r} registered twice")
        _REGISTRY[name] = (config_cls, router_cls)
        return router_cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside an existing router module
                raise


def router_types() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def router_config_from_dict(data: dict[str, Any] | RouterConfig, where: str = "router") -> RouterConfig:
    if isinstance(data, RouterConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {data!r}")
    _load_builtins()
    kind = data.get("type", "topk")
    if kind not in _REGISTRY:
        raise ConfigError(f"{where}.type must be one of {sorted(_REGISTRY)}, got {kind!r}")
    return from_dict(_REGISTRY[kind][0], {**data, "type": kind}, f"{where}[{kind}]")


def build_router(cfg: RouterConfig, *, d_model: int, num_experts: int, top_k: int, layer_index: int):
    _load_builtins()
    return _REGISTRY[cfg.type][1](cfg, d_model=d_model, num_experts=num_experts, top_k=top_k,
                                  layer_index=layer_index)
