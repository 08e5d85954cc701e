"""Forced routes: a router's expert choice replaced by given ids (route replay, docs/routing_trace.md).

Legend: moe_dist/moe/__init__.py.

Pure functions of tensors, no state: the forced ids reach a router through `RoutingContext.forced`
(the MoE layer puts them there from `MoESideInputs.forced_routes`), every router chooses its
experts through `choose_experts`, so with ids alone the weights are the router's own formula at
the forced ids (the router still trains and its statistics are its own). Forced weights replace
the router's combine weights after it ran (`with_forced_weights`); those carry no gradient to
the router, which then trains through its aux losses only.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from moe_dist.routing.base import ForcedRoute, RouterOutput

__all__ = ["ForcedRoute", "choose_experts", "forced_or", "with_forced_weights"]


def _forced_ids(forced: ForcedRoute, num_tokens: int, top_k: int) -> Tensor:
    # A forced route of another shape is refused here, where its origin is still known.
    if tuple(forced.idx_TK.shape) != (num_tokens, top_k):
        raise ValueError(f"forced routes have shape {tuple(forced.idx_TK.shape)}, the layer routes "
                         f"{num_tokens} tokens to top_k={top_k} experts")
    return forced.idx_TK  # itself: the layer checks by identity that its router took them


def choose_experts(select_TE: Tensor, top_k: int, forced: ForcedRoute | None) -> Tensor:
    """The top-k experts of `select_TE`, or the forced ids when there are some."""
    if forced is None:
        return torch.topk(select_TE, top_k, dim=-1).indices
    return _forced_ids(forced, select_TE.shape[0], top_k)


def forced_or(idx_TK: Tensor, forced: ForcedRoute | None) -> Tensor:
    """`idx_TK`, or the forced ids when there are some: for routers that choose without scores (hash)."""
    return idx_TK if forced is None else _forced_ids(forced, *idx_TK.shape)


def with_forced_weights(route: RouterOutput, forced: ForcedRoute | None) -> RouterOutput:
    """`route` with the forced combine weights, where the forced route has weights."""
    if forced is None or forced.w_TK is None:
        return route
    # drop_policy "probs" then ranks by the forced weights too, as the recorded run did.
    return replace(route, w_TK=forced.w_TK.to(device=route.w_TK.device, dtype=route.w_TK.dtype))
