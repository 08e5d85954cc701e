"""All-to-all over the expert-parallel group, as autograd functions.

Legend: N rows sent by this rank, M rows received, D row width, P group size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.parallel import collectives


def exchange_counts(counts_P: Tensor, group) -> Tensor:
    """Send `counts_P[p]` to rank p of `group`; returns what each rank sent to this one.
    Tiny and equal-split: it tells every rank the split sizes of the token all-to-all."""
    out = torch.empty_like(counts_P)
    collectives.all_to_all_single(out, counts_P.contiguous(), group=group)
    return out


def _all_to_all(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    out_MD = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
    collectives.all_to_all_single(out_MD, x_ND.contiguous(), recv_splits, send_splits, group)
    return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        return _all_to_all(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        send_splits, recv_splits = ctx.splits
        # The gradient of a permutation across ranks is the reverse permutation.
        return _all_to_all(grad_MD, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Rows `x_ND[sum(send_splits[:p]) : sum(send_splits[:p+1])]` go to rank p of `group`;
    the result stacks, in rank order, the `recv_splits[p]` rows rank p sent here."""
    return _AllToAll.apply(x_ND, send_splits, recv_splits, group)
