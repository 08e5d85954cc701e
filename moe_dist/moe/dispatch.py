"""Dispatch kept (token, choice) pairs to their experts' ranks and combine the results.

Legend: moe_dist/moe/__init__.py (the letters at work here: P ranks in the EP group, Q routed
pairs, N kept pairs this rank sends, M rows its experts run, U rows they gather from; S rows
the combine reads, Q of them).

One path serves every mode: capacity only decides which pairs are kept (capacity.py), so fixed
capacity, dropless, EP=1 and EP=P differ only in the all-to-all.

Host reads (a GPU waits on each): none at EP 1, where every shape is static. All Q pairs are
sorted by expert, dropped ones past the last expert, and the experts run the rows their device
counts cover (the kernels leave the rows past them zero), so nothing is sized by a count. At
EP > 1 exactly one per forward: the uneven all-to-all needs its split sizes on the host, so the
send and receive counts are read together, once, after the counts are exchanged (Megatron-Core's
alltoall dispatcher and torchtitan read the same). Every permutation is built on the device, and
the backward reuses the host splits it saved: no read.
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

    rank_TK: Tensor  # each pair's row among the S rows `combine` reads (expert order; dropped last)
    pair_S: Tensor  # the pair (choice-major id k*T + t) at each of those rows: rank_TK's inverse
    keep_TK: Tensor  # bool: the pair was kept (a dropped pair's row is ignored, whatever it holds)
    counts_e: Tensor  # int64 rows per local expert, in the order the experts see them (on the device)
    send_splits: list[int] | None = None  # rows sent to each EP rank; None when P == 1
    recv_splits: list[int] | None = None  # rows received from each EP rank
    unsort_M: Tensor | None = None  # expert-major rows -> received (source-major) order
    # Host rows of `report_R` from every EP rank, in rank order (None: no report was sent).
    reports: list[list[int]] | None = None


def _regroup_by_expert(recv_counts_Pe: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """Permutations between source-major rows (the all-to-all's order: source, expert, token)
    and expert-major rows (what grouped GEMMs need: expert, source, token), built on the device
    from the counts; `M` (their sum) is known on the host from the split sizes."""
    P, e = recv_counts_Pe.shape
    sizes = recv_counts_Pe.flatten()
    src_major_start = (torch.cumsum(sizes, 0) - sizes).view(P, e)
    block_start = src_major_start.t().flatten()  # blocks visited in expert-major order
    block_size = recv_counts_Pe.t().flatten()
    within = torch.arange(M, device=sizes.device) - torch.repeat_interleave(
        torch.cumsum(block_size, 0) - block_size, block_size, output_size=M)
    sort_M = torch.repeat_interleave(block_start, block_size, output_size=M) + within
    unsort_M = torch.empty_like(sort_M)
    unsort_M[sort_M] = torch.arange(M, device=sizes.device)
    return sort_M, unsort_M


def dispatch(x_TD: Tensor, idx_TK: Tensor, keep_TK: Tensor, kept_E: Tensor,
             groups: ParallelGroups, report_R: Tensor | None = None) -> tuple[Tensor, Tensor, DispatchPlan]:
    """Returns the rows this rank's experts must process, grouped by local expert, as a source
    and the gather index into it (`source_UD[index_M]`; the experts gather, see
    `GroupedExperts.forward`), and the plan.

    EP 1: the source is `x_TD` itself (U = T) and the index holds all Q pairs' tokens in expert
    order, dropped pairs last: M = Q, of which the experts' counts cover the kept ones.
    EP > 1: the kept pairs' rows go to their experts' ranks (rows for EP rank p are contiguous,
    since p owns experts [p*e, (p+1)*e)); the source is the received rows (U = M) and the index
    reorders them from source-major to expert-major.

    `report_R` (int64, EP > 1): a few numbers every EP rank must see before any row moves
    (`moe.overflow: error`'s overflow report, moe/rank_budget.py). They ride on the count exchange
    and the split read, no collective or host read of their own; `plan.reports` holds every
    rank's, read.
    """
    T, K = idx_TK.shape
    E = kept_E.numel()
    P = groups.ep_size
    idx_Q = idx_TK.t().reshape(-1)  # choice-major: q = k*T + t
    sort_key_Q = torch.where(keep_TK.t().reshape(-1), idx_Q, E)
    pair_S = torch.sort(sort_key_Q, stable=True).indices  # the pair at each sorted row
    rank_Q = torch.empty_like(pair_S)
    rank_Q[pair_S] = torch.arange(pair_S.numel(), device=pair_S.device)
    rank_TK = rank_Q.view(K, T).t()
    if P == 1:
        return x_TD, pair_S % T, DispatchPlan(rank_TK, pair_S, keep_TK, kept_E)

    send_counts_Pe = kept_E.view(P, E // P)
    if report_R is None:
        recv_counts_Pe = exchange_counts(send_counts_Pe, groups.ep_group)
        reports_PR = send_counts_Pe.new_zeros((P, 0))
    else:
        R = report_R.numel()
        sent_PX = torch.cat([send_counts_Pe, report_R.reshape(1, R).expand(P, R)], 1)
        recv_PX = exchange_counts(sent_PX, groups.ep_group)
        recv_counts_Pe, reports_PR = recv_PX[:, :E // P], recv_PX[:, E // P:]
    # The one host read:
    splits = torch.cat([send_counts_Pe.sum(1), recv_counts_Pe.sum(1), reports_PR.flatten()]).tolist()
    send_splits, recv_splits = splits[:P], splits[P:2 * P]
    reports = None if report_R is None else [splits[2 * P + p * R:2 * P + (p + 1) * R] for p in range(P)]
    x_ND = x_TD.index_select(0, pair_S[:sum(send_splits)] % T)
    x_MD = all_to_all(x_ND, send_splits, recv_splits, groups.ep_group)
    sort_M, unsort_M = _regroup_by_expert(recv_counts_Pe, sum(recv_splits))
    plan = DispatchPlan(rank_TK, pair_S, keep_TK, recv_counts_Pe.sum(0), send_splits, recv_splits, unsort_M,
                        reports)
    return x_MD, sort_M, plan


def _sum_dtype(y: Tensor) -> torch.dtype:
    return torch.promote_types(y.dtype, torch.float32)  # fp32, or wider where y is


class _WeightedChoiceSum(torch.autograd.Function):
    """`out_t = sum_k w_tk * y_SD[rank_tk]` over kept pairs, accumulated in fp32 (fp64 for fp64
    rows) in the fixed order k = 0, 1, ..., K-1, with fp32 weights, and cast back to y's dtype.

    Deterministic by construction: no atomics and one summation order on every device. Every
    pair has its own row of `y_SD` (`pair_S[s]` is the pair at row s), so the backward is a
    gather per row, never a scatter-add. One [T, D] choice at a time in the forward, not a
    [K, T, D] buffer: the same sums with K times smaller temporaries. A dropped pair's row is
    masked, never multiplied (it may hold anything, and 0 * NaN is NaN).
    """

    @staticmethod
    def forward(ctx, y_SD: Tensor, w_TK: Tensor, rank_TK: Tensor, keep_TK: Tensor, pair_S: Tensor) -> Tensor:
        acc = _sum_dtype(y_SD)
        w32_TK = torch.where(keep_TK, w_TK.to(torch.promote_types(w_TK.dtype, torch.float32)), 0.0)
        out_TD = None
        for k in range(rank_TK.shape[1]):
            rows_TD = y_SD.index_select(0, rank_TK[:, k]).to(acc).masked_fill_(~keep_TK[:, k, None], 0.0)
            if out_TD is None:
                out_TD = rows_TD.mul_(w32_TK[:, k, None])
            else:
                out_TD.addcmul_(rows_TD, w32_TK[:, k, None])
        ctx.save_for_backward(y_SD, w32_TK, keep_TK, pair_S)
        ctx.w_dtype = w_TK.dtype
        return out_TD.to(y_SD.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD: Tensor):
        y_SD, w32_TK, keep_TK, pair_S = ctx.saved_tensors
        T = grad_TD.shape[0]
        # Row s's pair is q = k*T + t: its upstream gradient is token t's.
        g_SD = grad_TD.to(_sum_dtype(y_SD)).index_select(0, pair_S % T)
        grad_w_TK = None
        if ctx.needs_input_grad[1]:
            keep_S = keep_TK.t().reshape(-1).index_select(0, pair_S)
            dot_S = torch.linalg.vecdot(g_SD, y_SD.to(g_SD.dtype))
            grad_w_Q = torch.empty_like(dot_S)
            grad_w_Q[pair_S] = torch.where(keep_S, dot_S, 0.0)
            grad_w_TK = grad_w_Q.view(-1, T).t().to(ctx.w_dtype)
        grad_y_SD = None
        if ctx.needs_input_grad[0]:  # a dropped pair's weight is 0 here: its row gets 0
            w_S = w32_TK.t().reshape(-1).index_select(0, pair_S)
            grad_y_SD = g_SD.mul_(w_S[:, None].to(g_SD.dtype)).to(y_SD.dtype)
        return grad_y_SD, grad_w_TK, None, None, None


def combine(y_MD: Tensor, w_TK: Tensor, plan: DispatchPlan, groups: ParallelGroups) -> Tensor:
    """Reverse of `dispatch`, then `y_t = sum_k w_tk * expert_out_tk` (dropped pairs add 0),
    summed in fp32 in a fixed order (`_WeightedChoiceSum`)."""
    y_SD = y_MD  # EP 1: the experts ran every pair's row, in the order of `rank_TK` (S = M = Q)
    if plan.unsort_M is not None:
        y_ND = all_to_all(y_MD.index_select(0, plan.unsort_M), plan.recv_splits, plan.send_splits,
                          groups.ep_group)
        # The dropped pairs' rows, past the N kept ones: zeros, so every pair has a row.
        y_SD = torch.cat([y_ND, y_ND.new_zeros((w_TK.numel() - y_ND.shape[0], y_ND.shape[1]))])
    return _WeightedChoiceSum.apply(y_SD, w_TK, plan.rank_TK, plan.keep_TK, plan.pair_S)
