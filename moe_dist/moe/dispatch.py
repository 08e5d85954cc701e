"""Dispatch kept (token, choice) pairs to their experts' ranks and combine the results.

Legend: moe_dist/moe/__init__.py (the letters at work here: P ranks in the EP group, Q routed
pairs, N kept pairs this rank sends, M rows its experts run, U rows they gather from).

One path serves every mode: capacity only decides which pairs are kept (capacity.py), so fixed
capacity, dropless, EP=1 and EP=P differ only in the all-to-all. Rows travel exactly: no
capacity padding is sent or multiplied, at the price of exchanging split sizes first (a tiny
all-to-all, and on GPUs one host sync per layer, as in Megatron-Core's alltoall dispatcher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.parallel.all_to_all import all_to_all, exchange_counts
from moe_dist.parallel.groups import ParallelGroups


@dataclass
class DispatchPlan:
    """What `combine` needs to bring expert outputs back to their tokens."""

    pair_N: Tensor  # kept pairs (choice-major ids k*T + t), sorted by expert
    token_N: Tensor  # the token each sent row came from
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    unsort_M: Tensor | None  # expert-major rows -> received (source-major) order; None when P == 1
    counts_e: list[int]  # rows per local expert, in the order the experts see them


def _regroup_by_expert(recv_counts_Pe: Tensor) -> tuple[Tensor, Tensor]:
    """Permutations between source-major rows (the all-to-all's order: source, expert, token)
    and expert-major rows (what grouped GEMMs need: expert, source, token)."""
    P, e = recv_counts_Pe.shape
    sizes = recv_counts_Pe.flatten()
    src_major_start = (torch.cumsum(sizes, 0) - sizes).view(P, e)
    block_start = src_major_start.t().flatten()  # blocks visited in expert-major order
    block_size = recv_counts_Pe.t().flatten()
    M = int(sizes.sum())
    within = torch.arange(M, device=sizes.device) - torch.repeat_interleave(
        torch.cumsum(block_size, 0) - block_size, block_size, output_size=M)
    sort_M = torch.repeat_interleave(block_start, block_size, output_size=M) + within
    unsort_M = torch.empty_like(sort_M)
    unsort_M[sort_M] = torch.arange(M, device=sizes.device)
    return sort_M, unsort_M


def dispatch(x_TD: Tensor, idx_TK: Tensor, keep_TK: Tensor, kept_E: Tensor,
             groups: ParallelGroups) -> tuple[Tensor, Tensor, DispatchPlan]:
    """Returns the rows this rank's experts must process, grouped by local expert, as a source
    and the gather index into it (`source_UD[index_M]`; the experts gather, see
    `GroupedExperts.forward`), and the plan. The source is `x_TD` itself at EP 1 (U = T, and the
    index is `token_N`: M = N) and the received rows `x_MD` otherwise (U = M).

    1. Sort kept pairs by expert (dropped pairs sort last and are cut off).
    2. Gather their token rows: rows for EP rank p are contiguous, since p owns experts
       [p*e, (p+1)*e).
    3. Exchange per-expert counts, then the rows (uneven all-to-all over the EP group).
    4. The index that reorders received rows from source-major to expert-major for the grouped
       GEMM.
    """
    T, K = idx_TK.shape
    E = kept_E.numel()
    P = groups.ep_size
    idx_Q = idx_TK.t().reshape(-1)
    sort_key_Q = torch.where(keep_TK.t().reshape(-1), idx_Q, E)
    kept_counts = kept_E.tolist()  # the one host sync: sizes of everything below
    N = sum(kept_counts)
    pair_N = torch.sort(sort_key_Q, stable=True).indices[:N]
    token_N = pair_N % T
    if P == 1:
        return x_TD, token_N, DispatchPlan(pair_N, token_N, [N], [N], None, kept_counts)

    x_ND = x_TD.index_select(0, token_N)

    send_counts_Pe = kept_E.view(P, E // P)
    recv_counts_Pe = exchange_counts(send_counts_Pe, groups.ep_group)
    send_splits = send_counts_Pe.sum(1).tolist()
    recv_splits = recv_counts_Pe.sum(1).tolist()
    x_MD = all_to_all(x_ND, send_splits, recv_splits, groups.ep_group)
    sort_M, unsort_M = _regroup_by_expert(recv_counts_Pe.cpu())
    plan = DispatchPlan(pair_N, token_N, send_splits, recv_splits, unsort_M.to(x_MD.device),
                        recv_counts_Pe.sum(0).tolist())
    return x_MD, sort_M.to(x_MD.device), plan


# Row chunk for the [N, D] elementwise work of the combine: temporaries of this size stay in
# cache and in the allocator's reused heap; whole [N, D] temporaries are fresh pages to fault in
# every step on CPU (the measurement: BENCHMARKS.md, "Kernel tuning constants").
_CHUNK_ROWS = 2048


class _WeightedScatterAdd(torch.autograd.Function):
    """`out_TD[token_N[n]] += w_N[n] * y_ND[n]`.

    The same values as autograd's `zeros.index_add(0, token_N, y_ND * w_N[:, None])` without its
    [N, D] temporaries: the weighted rows are summed in place chunk by chunk, and the backward
    turns the gathered gradient into dy in place.
    """

    @staticmethod
    def forward(ctx, y_ND: Tensor, w_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:
        out_TD = y_ND.new_zeros((num_tokens, y_ND.shape[-1]))
        for s in range(0, y_ND.shape[0], _CHUNK_ROWS):
            rows = slice(s, s + _CHUNK_ROWS)
            out_TD.index_add_(0, token_N[rows], y_ND[rows] * w_N[rows, None])
        ctx.save_for_backward(y_ND, w_N, token_N)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_ND, w_N, token_N = ctx.saved_tensors
        grad_ND = grad_TD.index_select(0, token_N)
        grad_w_N = None
        if ctx.needs_input_grad[1]:
            grad_w_N = torch.empty_like(w_N)
            for s in range(0, y_ND.shape[0], _CHUNK_ROWS):
                rows = slice(s, s + _CHUNK_ROWS)
                torch.linalg.vecdot(grad_ND[rows], y_ND[rows], out=grad_w_N[rows])
        grad_y_ND = grad_ND.mul_(w_N[:, None]) if ctx.needs_input_grad[0] else None
        return grad_y_ND, grad_w_N, None, None


def combine(y_MD: Tensor, w_TK: Tensor, plan: DispatchPlan, groups: ParallelGroups) -> Tensor:
    """Reverse of `dispatch`, then `y_t = sum_k w_tk * expert_out_tk` (dropped pairs add 0)."""
    T = w_TK.shape[0]
    y_ND = y_MD  # EP 1: the experts ran exactly the rows this rank sends (M = N)
    if plan.unsort_M is not None:
        y_ND = all_to_all(y_MD.index_select(0, plan.unsort_M), plan.recv_splits, plan.send_splits,
                          groups.ep_group)
    w_N = w_TK.t().reshape(-1).index_select(0, plan.pair_N).to(y_ND.dtype)
    return _WeightedScatterAdd.apply(y_ND, w_N, plan.token_N, T)
