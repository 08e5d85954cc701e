"""The loss and the routing statistics of a model over evaluation windows, in one process or on
every rank under the launcher (same code). Every rank sums its losses and its own routing counts
on the model's device; at the end one all-reduce over the data-parallel group sums them over ranks
and one host read brings them back.

Under the launcher each round takes `world * batch` windows from the stream (every rank reads
the same stream) and rank r runs windows r, r + world, ...; windows of one forward have one
length (only the stream's last window is shorter). Every rank of an expert-parallel group must
run the same number of forwards (the all-to-alls), so a rank with fewer windows in the last round
runs a one-token padding forward that adds nothing to the loss, and nothing to the routing
statistics either: its token is masked (`valid_BS`, MoESideInputs.valid_T). With dropless eval capacity the loss
does not depend on batching, so any world and EP size gives the one-process number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moe_dist.evaluate.precision import standard_error
from moe_dist.evaluate.sources import Window
from moe_dist.evaluate.trace_replay import RouteReplay
from moe_dist.evaluate.trace_writer import TraceWriter
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.stats import interval_summary
from moe_dist.parallel.groups import ParallelGroups

_SUMMED = ("tokens_per_expert", "tokens_per_expert_kept", "expert_label_counts")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class EvalResult:
    tokens: int
    loss: float
    loss_sem: float  # standard error of the mean loss over windows (precision.py)
    windows: int
    domain_names: list[str]
    # name -> {"tokens", "loss", "perplexity"}; "(unlabelled)" for tokens without a label
    domains: dict[str, dict[str, float]] = field(default_factory=dict)
    moe_layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity,
                "loss_sem": self.loss_sem, "windows": self.windows, "domain_names": self.domain_names,
                "domains": self.domains, "moe_layers": {str(k): v for k, v in self.moe_layers.items()}}


def _length_runs(chunk: list[Window], batch: int) -> list[list[Window]]:
    runs: list[list[Window]] = []
    for w in chunk:
        if runs and len(runs[-1]) < batch and runs[-1][0].tokens.numel() == w.tokens.numel():
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def _rounds(windows: Iterable[Window], batch: int, world: int,
            rank: int) -> Iterator[tuple[list[list[Window]], int, int]]:
    """Per round: this rank's forwards (lists of equal-length windows), the number of forwards
    every rank runs, and the tokens predicted by all ranks together (every rank reads the same
    stream, so each knows the round's total without a collective)."""
    it = iter(windows)
    while chunk := list(islice(it, batch * world)):
        mine = _length_runs(chunk[rank::world], batch)
        predicted = sum(w.tokens.numel() - 1 for w in chunk)
        yield mine, max(len(_length_runs(chunk[r::world], batch)) for r in range(world)), predicted


class _Totals:
    """Everything the evaluation sums, on the model's device (no host read per forward): per
    domain (last: unlabelled) the summed NLL and the tokens, then windows and the sum and sum of
    squares of window means, and the routing counts; reduced over ranks in one packed all-reduce."""

    def __init__(self, num_domains: int, device: torch.device) -> None:
        self.nll = torch.zeros(num_domains + 1, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_domains + 1, dtype=torch.float64, device=device)
        self.windows = torch.zeros(3, dtype=torch.float64, device=device)
        self.routing: dict[int, dict[str, torch.Tensor]] = {}

    def add_loss(self, nll_BS: torch.Tensor, labels_BS: torch.Tensor) -> None:
        L = self.nll.numel() - 1
        cell = torch.where(labels_BS >= 0, labels_BS, L).reshape(-1)
        # Per-domain sums as a reduction over a one-hot table, not index_add_: on CUDA that adds
        # with atomics in a varying order, and the evaluation is asserted bit-exact.
        onehot_QL = F.one_hot(cell, L + 1).to(torch.float64)
        self.nll += (nll_BS.reshape(-1, 1).double() * onehot_QL).sum(0)
        self.count += onehot_QL.sum(0)
        means = nll_BS.double().mean(1)
        windows = torch.full((), float(means.numel()), dtype=torch.float64, device=means.device)
        self.windows += torch.stack([windows, means.sum(), means.square().sum()])

    def add_routing(self, moe_stats: dict[int, dict[str, torch.Tensor]]) -> None:
        for layer, stats in moe_stats.items():
            row = self.routing.setdefault(layer, {})
            for name in _SUMMED:
                if name in stats:
                    value = stats[name].detach().double()
                    row[name] = value if name not in row else row[name] + value

    def pack(self) -> tuple[torch.Tensor, list[tuple[int, str, torch.Size]]]:
        layout = [(layer, name, self.routing[layer][name].shape)
                  for layer in sorted(self.routing) for name in sorted(self.routing[layer])]
        parts = [self.nll, self.count, self.windows] + [self.routing[l][n].reshape(-1).to(self.nll.device)
                                                         for l, n, _ in layout]
        return torch.cat(parts), layout


@torch.no_grad()
def evaluate(model: MoETransformer, windows: Iterable[Window], domain_names: list[str], *, batch: int = 8,
             groups: ParallelGroups | None = None, progress: bool = True,
             total_tokens: int | None = None, trace: TraceWriter | None = None,
             replay: RouteReplay | None = None, step: int = 0) -> EvalResult:
    """Loss per domain and routing statistics over `windows` (on every rank: collective, one
    all-reduce at the end; nothing is read to the host before it).

    `model.cfg.num_labels` must be len(domain_names) for the label statistics (0: none).
    `trace`: write the routing trace of every forward (phase eval, `step`, forwards numbered per
    rank; each trace read is a host read, so a traced evaluation is not the no-read one).
    `replay`: take the routes of such a trace (padding forwards route as usual)."""
    groups = groups or ParallelGroups.single()
    world, rank = groups.dp_size, groups.rank if groups.dp_size > 1 else 0
    device = next(model.parameters()).device
    model.eval()
    totals = _Totals(len(domain_names), device)
    bar = tqdm(total=total_tokens, unit="tok", desc="evaluate", disable=not progress or rank != 0)
    forward = -1
    for mine, calls, predicted in _rounds(windows, batch, world, rank):
        for i in range(calls):
            forward += 1
            valid = None
            if i < len(mine):
                tokens = torch.stack([w.tokens for w in mine[i]]).to(device)
                labels = torch.stack([w.domain_ids for w in mine[i]]).to(device)
            else:  # padding forward, see the module docstring
                tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
                labels = torch.full_like(tokens, -1)
                valid = torch.zeros(1, 1, dtype=torch.bool, device=device)
            real = i < len(mine)
            forced = None
            if replay is not None and real:
                forced = replay.forced_routes("eval", step, forward, tokens[:, :-1].numel(), device)
            out = model(tokens[:, :-1], domain_ids_BS=labels[:, :-1], valid_BS=valid,
                        trace=trace is not None and real, forced_routes=forced)
            if trace is not None and real:
                trace.add(forward, tokens[:, :-1], labels[:, :-1], out.routes)
            totals.add_routing(out.moe_stats)
            if i < len(mine):
                nll = F.cross_entropy(out.logits_BSV.float().transpose(1, 2), tokens[:, 1:], reduction="none")
                totals.add_loss(nll, labels[:, 1:])
        bar.update(predicted)
    bar.close()
    if trace is not None:
        trace.flush("eval", step)
    packed, layout = totals.pack()
    packed = groups.all_reduce_sum_dp(packed).tolist()  # the evaluation's one host read
    L1 = len(domain_names) + 1
    nll, count, win = packed[:L1], packed[L1:2 * L1], packed[2 * L1:2 * L1 + 3]
    routing: dict[int, dict[str, torch.Tensor]] = {}
    offset = 2 * L1 + 3
    for layer, name, shape in layout:
        n = math.prod(shape)
        # host values from here on: a CPU tensor for the summary's arithmetic
        routing.setdefault(layer, {})[name] = torch.tensor(packed[offset:offset + n], dtype=torch.float64).view(shape)
        offset += n
    n = sum(count)
    if n == 0:
        raise ValueError("the evaluation data holds no token to predict (each document needs at least one token)")
    domains = {}
    for j, name in enumerate([*domain_names, "(unlabelled)"]):
        if count[j] > 0:
            loss_j = nll[j] / count[j]
            domains[name] = {"tokens": int(count[j]), "loss": loss_j, "perplexity": perplexity(loss_j)}
    return EvalResult(tokens=int(n), loss=sum(nll) / n, loss_sem=standard_error(win[0], win[1], win[2]),
                      windows=int(win[0]), domain_names=list(domain_names), domains=domains,
                      moe_layers={layer: routing_summary(row) for layer, row in sorted(routing.items())})


def routing_summary(row: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Dropped fraction, load CV, max/mean load, and with labels I(expert; domain) and the
    expert-by-domain table, from summed counts (ratios of sums, not means of ratios)."""
    load_E = row["tokens_per_expert"]
    summary = interval_summary(load_E, row["tokens_per_expert_kept"], row.get("expert_label_counts"))
    out: dict[str, Any] = {
        "dropped_fraction": summary.dropped_fraction, "load_cv": summary.load_cv,
        "load_max_over_mean": summary.load_max_over_mean,
        "tokens_per_expert": [int(v) for v in load_E.tolist()],
    }
    if summary.mi_domain is not None:
        out["mi_domain"], out["mi_domain_normalized"] = summary.mi_domain, summary.mi_domain_normalized
        out["expert_domain_counts"] = [[int(v) for v in r] for r in row["expert_label_counts"].tolist()]
    return out
