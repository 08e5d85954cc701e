"""What a routing trace says (tools/routing_trace.py, docs/routing_trace.md): expert load over steps,
route stability between two steps or two traces of the same tokens, token-id and domain affinity
per expert, and the difference between two traces. Pure numpy over the trace's columns.

Tokens are matched between steps or traces on their key (rank, micro batch, row, position, layer)
and must carry the same token id there: the evaluation forwards of a training trace (the same
validation batches at every evaluation) and two `tools/evaluate.py --trace` runs on the same data
are such traces; training batches differ from step to step and are never matched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from moe_dist.evaluate.trace_format import (SHAPE_FIELDS, STATUS, TraceError, check_identity, experts_of,
                                            read_metadata)
from moe_dist.evaluate.trace_replay import trace_files

KEY = ("rank", "micro", "row", "position", "layer")
SCALARS = ("step", "micro", "rank", "layer", "row", "position", "document", "domain", "token_id")


@dataclass
class Trace:
    meta: dict[str, Any]  # the first file's metadata (identity and settings)
    phase: np.ndarray  # str per row
    cols: dict[str, np.ndarray]  # SCALARS, int64 per row
    experts: np.ndarray  # [rows, K]
    weights: np.ndarray  # [rows, K]
    status: np.ndarray  # [rows, K]
    where: str

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    def select(self, mask: np.ndarray) -> Trace:
        return Trace(self.meta, self.phase[mask], {k: v[mask] for k, v in self.cols.items()}, self.experts[mask],
                     self.weights[mask], self.status[mask], self.where)

    def steps(self, phase: str) -> list[int]:
        return sorted(set(self.cols["step"][self.phase == phase].tolist()))


def read_trace(directory: str, progress: Callable[[Iterable], Iterable] = iter) -> Trace:
    """Every file of a trace directory; files from different models are refused."""
    files = trace_files(directory, "trace")
    meta = None
    parts = []
    for path in progress(list(files.values())):
        table = pq.read_table(path)
        file_meta = read_metadata(table.schema, path)
        if meta is None:
            meta, first = file_meta, path
        else:
            check_identity(file_meta, meta, path, first)
        parts.append(table)
    phase = np.concatenate([t.column("phase").to_numpy(zero_copy_only=False).astype(str) for t in parts])
    cols = {k: np.concatenate([t.column(k).to_numpy().astype(np.int64) for t in parts]) for k in SCALARS}
    return Trace(meta, phase, cols, np.concatenate([experts_of(t).astype(np.int64) for t in parts]),
                 np.concatenate([experts_of(t, "weights") for t in parts]),
                 np.concatenate([experts_of(t, "status") for t in parts]), directory)


def expert_load(trace: Trace, phase: str = "train") -> dict[int, dict[str, Any]]:
    """Per MoE layer, per step of `phase`: each expert's share of the routed pairs (before
    capacity) and the dropped fraction of the pairs."""
    E = trace.num_experts
    out: dict[int, dict[str, Any]] = {}
    sel = trace.select(trace.phase == phase)
    for layer in sorted(set(sel.cols["layer"].tolist())):
        rows = sel.select(sel.cols["layer"] == layer)
        steps = rows.steps(phase)
        shares, dropped = [], []
        for step in steps:
            at = rows.cols["step"] == step
            counts = np.bincount(rows.experts[at].reshape(-1), minlength=E)
            shares.append((counts / max(counts.sum(), 1)).tolist())
            dropped.append(float((rows.status[at] == STATUS["dropped"]).mean()))
        out[layer] = {"steps": steps, "share": shares, "dropped_fraction": dropped}
    return out


def _keyed(trace: Trace) -> dict[tuple, int]:
    key = np.stack([trace.cols[k] for k in KEY], axis=1)
    return {tuple(row): i for i, row in enumerate(key.tolist())}


def match(a: Trace, b: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (ia, ib) of the tokens both traces hold at the same key; a key whose token ids
    differ means the traces are not of the same tokens, refused."""
    kb = _keyed(b)
    ia, ib = [], []
    for key, i in _keyed(a).items():
        j = kb.get(key)
        if j is not None:
            ia.append(i)
            ib.append(j)
    ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
    differ = np.flatnonzero(a.cols["token_id"][ia] != b.cols["token_id"][ib])
    if len(differ):
        i = ia[differ[0]]
        where = ", ".join(f"{k} {a.cols[k][i]}" for k in KEY)
        raise TraceError(f"{a.where} and {b.where} are not traces of the same tokens: at {where} token "
                         f"{a.cols['token_id'][i]} vs {b.cols['token_id'][ib[differ[0]]]} "
                         f"({len(differ)} of {len(ia)} matched positions differ)")
    return ia, ib


def route_stability(experts_a: np.ndarray, experts_b: np.ndarray) -> dict[str, float]:
    """Route stability of the same N tokens routed twice ([N, K] expert ids, row i the same token,
    column 0 the top choice): the fraction whose top-1 expert is unchanged, and whose top-k set is
    unchanged (order ignored). Takes arrays, so that a run can score its own routes without a trace."""
    if experts_a.shape != experts_b.shape or experts_a.ndim != 2 or not len(experts_a):
        raise ValueError(f"route stability needs two [N, K] routings of the same N > 0 tokens, got shapes "
                         f"{experts_a.shape} and {experts_b.shape}")
    return {"top1_unchanged": float((experts_a[:, 0] == experts_b[:, 0]).mean()),
            "topk_set_unchanged": float((np.sort(experts_a, 1) == np.sort(experts_b, 1)).all(1).mean())}


def stability(a: Trace, b: Trace) -> dict[int, dict[str, float]]:
    """Per MoE layer, over the tokens both hold: `route_stability`."""
    ia, ib = match(a, b)
    out = {}
    layers = a.cols["layer"][ia]
    for layer in sorted(set(layers.tolist())):
        at = layers == layer
        out[layer] = {"tokens": int(at.sum()), **route_stability(a.experts[ia[at]], b.experts[ib[at]])}
    return out


def stability_over_steps(trace: Trace, phase: str = "eval") -> dict[int, list[dict[str, float]]]:
    """`stability` between each pair of consecutive steps of `phase` (evaluations: same tokens)."""
    steps = trace.steps(phase)
    out: dict[int, list[dict[str, float]]] = {}
    for s0, s1 in zip(steps, steps[1:]):
        pick = trace.phase == phase
        a = trace.select(pick & (trace.cols["step"] == s0))
        b = trace.select(pick & (trace.cols["step"] == s1))
        for layer, row in stability(a, b).items():
            out.setdefault(layer, []).append({"from_step": s0, "to_step": s1, **row})
    return out


def _mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """I(X; Y) in nats from a count table, and I / H(Y) with Y the columns (0 where H is 0)."""
    p = joint / max(joint.sum(), 1)
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())
    h = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    return mi, (mi / h if h > 0 else 0.0)


def affinity(trace: Trace, top_tokens: int = 5) -> dict[int, dict[str, Any]]:
    """Per MoE layer, over every routed pair: the expert-by-domain counts and I(expert; domain),
    I(token id; expert), and each expert's most frequent token ids with the share of the expert's
    pairs they take."""
    E = trace.num_experts
    out = {}
    for layer in sorted(set(trace.cols["layer"].tolist())):
        rows = trace.select(trace.cols["layer"] == layer)
        K = rows.experts.shape[1]
        experts = rows.experts.reshape(-1)
        tokens = np.repeat(rows.cols["token_id"], K)
        domains = np.repeat(rows.cols["domain"], K)
        vocab, token_index = np.unique(tokens, return_inverse=True)
        token_joint = np.zeros((len(vocab), E))
        np.add.at(token_joint, (token_index, experts), 1)
        mi_token, mi_token_norm = _mutual_information(token_joint)
        row: dict[str, Any] = {"mi_token_expert": mi_token, "mi_token_expert_normalized": mi_token_norm,
                               "top_tokens": {}}
        for e in range(E):
            counts = token_joint[:, e]
            best = np.argsort(-counts, kind="stable")[:top_tokens]
            row["top_tokens"][e] = [[int(vocab[i]), float(counts[i] / max(counts.sum(), 1))] for i in best
                                    if counts[i] > 0]
        labelled = domains >= 0
        if labelled.any():
            L = int(domains[labelled].max()) + 1
            joint = np.zeros((E, L))
            np.add.at(joint, (experts[labelled], domains[labelled]), 1)
            row["expert_domain_counts"] = joint.astype(int).tolist()
            row["mi_domain"], row["mi_domain_normalized"] = _mutual_information(joint)
        out[layer] = row
    return out


def difference(a: Trace, b: Trace) -> dict[int, dict[str, Any]]:
    """Per MoE layer, over the tokens both traces hold (two routers, two checkpoints): top-1 and
    top-k agreement, the mean Jaccard overlap of the top-k sets, the mean absolute difference of
    the weights where the top-k sets agree, the pairs whose status differs, and the top-1
    confusion table (a's expert by b's)."""
    check_identity(a.meta, b.meta, a.where, b.where, SHAPE_FIELDS)
    ia, ib = match(a, b)
    E = a.num_experts
    out = {}
    layers = a.cols["layer"][ia]
    for layer in sorted(set(layers.tolist())):
        at = layers == layer
        ea, eb = a.experts[ia[at]], b.experts[ib[at]]
        sa, sb = np.sort(ea, 1), np.sort(eb, 1)
        same_set = (sa == sb).all(1)
        overlap = np.array([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ea.tolist(), eb.tolist())])
        wa = np.take_along_axis(a.weights[ia[at]], np.argsort(ea, 1), 1)
        wb = np.take_along_axis(b.weights[ib[at]], np.argsort(eb, 1), 1)
        confusion = np.zeros((E, E), dtype=np.int64)
        np.add.at(confusion, (ea[:, 0], eb[:, 0]), 1)
        out[layer] = {
            "tokens": int(at.sum()), "top1_agreement": float((ea[:, 0] == eb[:, 0]).mean()),
            "topk_set_agreement": float(same_set.mean()), "mean_jaccard": float(overlap.mean()),
            "weight_mean_abs_difference": float(np.abs(wa - wb)[same_set].mean()) if same_set.any() else None,
            "status_changed_fraction": float((a.status[ia[at]] != b.status[ib[at]]).mean()),
            "top1_confusion": confusion.tolist()}
    return out
