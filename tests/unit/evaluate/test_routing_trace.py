"""The routing trace's files (moe_dist/evaluate/trace_format.py, trace_writer.py, trace_replay.py)
and what tools/routing_trace.py computes from them (trace_analysis.py): columns and status codes,
sampling, the size bounds, atomic files, the model identity refused on mismatch, and the
stability numbers of a trace with known routes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from moe_dist.evaluate import trace_analysis as ta
from moe_dist.evaluate.trace_format import STATUS, TraceError, file_name, row_bytes
from moe_dist.evaluate.trace_replay import RouteReplay
from moe_dist.evaluate.trace_writer import TraceWriter, sample_positions, trace_meta
from moe_dist.moe.layer import RouteRecord

E, K = 8, 2
IDENTITY = {"vocab_size": 100, "d_model": 16, "n_layers": 2, "moe_layers": [0, 1], "num_experts": E, "top_k": K,
            "router": "topk"}


def writer(path, identity=IDENTITY, **kw) -> TraceWriter:
    kw.setdefault("tokens", None)
    return TraceWriter(str(path), trace_meta(identity, source="test", world_size=1, ep_size=1), rank=0, top_k=K,
                       eod=99, **kw)


def record(idx, w=None, keep=None, spilled=None) -> RouteRecord:
    idx = torch.as_tensor(idx)
    return RouteRecord(idx_TK=idx, w_TK=torch.rand(idx.shape) if w is None else torch.as_tensor(w),
                       keep_TK=torch.ones(idx.shape, dtype=torch.bool) if keep is None else torch.as_tensor(keep),
                       spilled_TK=spilled)


def test_columns_status_codes_documents_and_the_model_in_the_metadata(tmp_path):
    tokens = torch.tensor([[5, 6, 99, 7], [8, 99, 9, 10]])
    domains = torch.tensor([[1, 1, 1, 2], [0, 0, 3, 3]])
    idx = torch.arange(16).view(8, 2) % E
    keep = torch.ones(8, 2, dtype=torch.bool)
    keep[1, 1] = False
    spilled = torch.zeros(8, 2, dtype=torch.bool)
    spilled[2, 0] = True
    w = writer(tmp_path)
    w.add(3, tokens, domains, {0: record(idx, keep=keep, spilled=spilled), 1: record(idx)})
    path = w.flush("train", 7)
    assert os.path.basename(path) == file_name("train", 7, 0) == "train-step00000007-rank00000.parquet"
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # the temporary name is gone
    df = pd.read_parquet(path)
    assert len(df) == 16 and set(df["layer"]) == {0, 1} and set(df["step"]) == {7} and set(df["micro"]) == {3}
    l0 = df[df["layer"] == 0]
    assert l0["token_id"].tolist() == tokens.reshape(-1).tolist()
    assert l0["domain"].tolist() == domains.reshape(-1).tolist()
    assert l0["row"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and l0["position"].tolist() == [0, 1, 2, 3] * 2
    assert l0["document"].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # the end-of-document token closes its document
    assert np.stack(l0["experts"]).tolist() == idx.tolist()
    status = np.stack(l0["status"])
    assert status[1, 1] == STATUS["dropped"] and status[2, 0] == STATUS["spilled"]
    assert (status == STATUS["kept"]).sum() == 14
    meta = ta.read_trace(str(tmp_path)).meta
    assert {k: meta[k] for k in IDENTITY} == IDENTITY and meta["status"] == STATUS


def test_sampling_is_strided_and_the_same_at_every_call():
    assert sample_positions(10, None).tolist() == list(range(10))
    assert sample_positions(10, 4).tolist() == [0, 2, 5, 7]
    assert sample_positions(3, 8).tolist() == [0, 1, 2]


def test_a_file_holds_at_most_its_bound_and_a_rank_stops_at_its_total(tmp_path):
    tokens = torch.zeros(4, 8, dtype=torch.long)
    idx = torch.zeros(32, 2, dtype=torch.long)
    per_file = 64 * 1024 + 40 * row_bytes(K)  # room for 40 rows of the 64 offered
    logged = []
    w = writer(tmp_path, max_file_bytes=per_file, max_total_bytes=3 * per_file, log=logged.append)
    w.add(0, tokens, None, {0: record(idx), 1: record(idx)})
    path = w.flush("train", 1)
    table = pq.read_table(path)
    assert table.num_rows == 40 and ta.read_trace(str(tmp_path)).meta["rows_left_out"] == 24
    assert os.path.getsize(path) <= per_file
    step = 1
    while w.active:
        step += 1
        w.add(0, tokens, None, {0: record(idx)})
        w.flush("train", step)
    assert len(logged) == 1 and "trace.max_total_mb" in logged[0]
    assert sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)) <= 3 * per_file


@pytest.mark.parametrize("field, value", [("vocab_size", 101), ("n_layers", 3), ("d_model", 32),
                                          ("moe_layers", [1]), ("num_experts", 4)])
def test_a_trace_of_another_model_is_refused_naming_the_difference(tmp_path, field, value):
    w = writer(tmp_path)
    w.add(0, torch.zeros(1, 4, dtype=torch.long), None, {0: record(torch.zeros(4, 2, dtype=torch.long)),
                                                         1: record(torch.zeros(4, 2, dtype=torch.long))})
    w.flush("eval", 0)
    other = {**IDENTITY, field: value}
    with pytest.raises(TraceError, match=rf"another model than this run's model: {field} "):
        RouteReplay(str(tmp_path), other, rank=0, world_size=1)
    # Another router type is not another model: its routes replay under this router's weights.
    assert RouteReplay(str(tmp_path), {**IDENTITY, "router": "fixed_projection"}, rank=0,
                       world_size=1).recorded_router == "topk"
    # Two traces of differently shaped models are not compared either.
    w2 = writer(tmp_path / "b", identity=other)
    w2.add(0, torch.zeros(1, 4, dtype=torch.long), None, {0: record(torch.zeros(4, 2, dtype=torch.long))})
    w2.flush("eval", 0)
    with pytest.raises(TraceError, match=rf"comes from another model .*{field}"):
        ta.difference(ta.read_trace(str(tmp_path)), ta.read_trace(str(tmp_path / "b")))


def test_replay_needs_every_token_the_same_world_size_and_a_trace(tmp_path):
    w = writer(tmp_path, tokens=2)
    w.add(0, torch.zeros(1, 4, dtype=torch.long), None, {0: record(torch.zeros(4, 2, dtype=torch.long))})
    w.flush("train", 1)
    with pytest.raises(TraceError, match=r"traced 2 tokens per micro batch; replay needs .*trace.tokens: all"):
        RouteReplay(str(tmp_path), IDENTITY, rank=0, world_size=1)
    full = writer(tmp_path / "full")
    full.add(0, torch.zeros(1, 4, dtype=torch.long), None, {0: record(torch.zeros(4, 2, dtype=torch.long))})
    full.flush("train", 1)
    with pytest.raises(TraceError, match="recorded with world size 1, this run has 2"):
        RouteReplay(str(tmp_path / "full"), IDENTITY, rank=0, world_size=2)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TraceError, match="holds no routing trace file"):
        RouteReplay(str(tmp_path / "empty"), IDENTITY, rank=0, world_size=1)
    with pytest.raises(TraceError, match="is not a directory of routing trace files"):
        RouteReplay(str(tmp_path / "absent"), IDENTITY, rank=0, world_size=1)


def test_replay_gives_each_forward_its_rows_in_token_order(tmp_path):
    idx = torch.randint(0, E, (6, 2))
    w_TK = torch.rand(6, 2)
    w = writer(tmp_path)
    w.add(0, torch.zeros(2, 3, dtype=torch.long), None, {0: record(idx, w_TK), 1: record(idx.flip(1))})
    w.add(1, torch.zeros(2, 3, dtype=torch.long), None, {0: record(idx + 0), 1: record(idx)})
    w.flush("train", 4)
    replay = RouteReplay(str(tmp_path), IDENTITY, rank=0, world_size=1, with_weights=True)
    forced = replay.forced_routes("train", 4, 0, 6, torch.device("cpu"))
    assert torch.equal(forced[0].idx_TK, idx) and torch.equal(forced[1].idx_TK, idx.flip(1))
    assert torch.equal(forced[0].w_TK, w_TK)
    assert replay.forced_routes("train", 5, 0, 6, torch.device("cpu")) is None  # not recorded: routes as usual
    one_layer = writer(tmp_path / "one_layer", layers=[1])
    one_layer.add(0, torch.zeros(2, 3, dtype=torch.long), None, {0: record(idx), 1: record(idx)})
    one_layer.flush("train", 4)
    forced = RouteReplay(str(tmp_path / "one_layer"), IDENTITY, rank=0, world_size=1).forced_routes(
        "train", 4, 0, 6, torch.device("cpu"))
    assert list(forced) == [1] and forced[1].w_TK is None  # the untraced layer routes as usual
    with pytest.raises(TraceError, match="6 rows for MoE layer 0 of forward 1, the forward routes 8 tokens"):
        replay.forced_routes("train", 4, 1, 8, torch.device("cpu"))


def _known(tmp_path, name: str, step: int, idx, router: str = "topk"):
    w = writer(tmp_path / name, identity={**IDENTITY, "router": router})
    w.add(0, torch.tensor([[11, 12, 13, 14]]), torch.tensor([[0, 0, 1, 1]]),
          {0: record(idx, keep=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool))})
    w.flush("eval", step)


A = [[0, 1], [2, 3], [4, 5], [6, 7]]
B = [[1, 0], [3, 2], [4, 6], [6, 7]]  # tokens 0, 1: the same set, top-1 changed; token 2: another set


def test_stability_and_difference_of_known_routes(tmp_path):
    _known(tmp_path, "both", 2, A)
    _known(tmp_path, "both", 4, B)
    trace = ta.read_trace(str(tmp_path / "both"))
    assert ta.stability_over_steps(trace) == {0: [{"from_step": 2, "to_step": 4, "tokens": 4,
                                                   "top1_unchanged": 0.5, "topk_set_unchanged": 0.75}]}
    _known(tmp_path, "a", 2, A)
    _known(tmp_path, "b", 9, B, router="fixed_projection")  # two routers of one model shape compare
    diff = ta.difference(ta.read_trace(str(tmp_path / "a")), ta.read_trace(str(tmp_path / "b")))[0]
    assert diff["top1_agreement"] == 0.5 and diff["topk_set_agreement"] == 0.75
    assert diff["mean_jaccard"] == pytest.approx((3 + 1 / 3) / 4)
    confusion = np.asarray(diff["top1_confusion"])
    assert confusion[0, 1] == confusion[2, 3] == confusion[4, 4] == confusion[6, 6] == 1 and confusion.sum() == 4
    assert diff["status_changed_fraction"] == 0.0


def test_traces_of_other_tokens_are_not_matched(tmp_path):
    _known(tmp_path, "a", 2, A)
    w = writer(tmp_path / "b")
    w.add(0, torch.tensor([[11, 12, 15, 14]]), None, {0: record(torch.tensor(A))})
    w.flush("eval", 2)
    with pytest.raises(TraceError, match=r"not traces of the same tokens: at rank 0, micro 0, row 0, position 2, "
                                         r"layer 0 token 13 vs 15"):
        ta.stability(ta.read_trace(str(tmp_path / "a")), ta.read_trace(str(tmp_path / "b")))


def test_load_and_affinity_of_known_routes(tmp_path):
    _known(tmp_path, "a", 2, A)
    trace = ta.read_trace(str(tmp_path / "a"))
    load = ta.expert_load(trace, "eval")[0]
    assert load["steps"] == [2] and load["share"] == [[1 / 8] * 8] and load["dropped_fraction"] == [1 / 8]
    aff = ta.affinity(trace)[0]
    # Experts 0-3 see only domain 0, 4-7 only domain 1: I(expert; domain) = H(domain) = log 2.
    assert aff["expert_domain_counts"] == [[1, 0]] * 4 + [[0, 1]] * 4
    assert aff["mi_domain"] == pytest.approx(np.log(2)) and aff["mi_domain_normalized"] == pytest.approx(1.0)
    assert aff["top_tokens"][2] == [[12, 1.0]]
    # Each token takes its own two experts: I(token; expert) = H(token) = log 4, H(expert) = log 8.
    assert aff["mi_token_expert_normalized"] == pytest.approx(2 / 3)
