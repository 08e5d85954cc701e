"""tools/evaluate.py against a hand-written loss: the same documents, concatenated with the
end-of-document id and cut into windows, through the model with every token reaching its
experts; per-domain numbers combine to the total by token weight; a Megatron prefix of the
same documents gives the same numbers; a token budget stops exactly there."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.checkpoint import save_consolidated
from moe_dist.evaluate.sources import windows
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from tests.harness import load_tool

S = 16
DOCS = [("the cat sat on the mat", "en"), ("le chat est sur le tapis", "fr"), ("a", "en"),
        ("der Hund schläft im Garten, und die Katze auch", "de"), ("ok", None),
        ("the quick brown fox jumps over the lazy dog " * 3, "en")]



def tiny_model(**moe) -> MoETransformer:
    cfg = parse_model_config(dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32,
                                  moe_every=1),
                             dict(num_experts=4, top_k=2, d_ff=16, capacity_factor=1.0, **moe))
    return MoETransformer(cfg, seed=5).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = tiny_model(eval_capacity_factor=0.5)  # a capacity that drops: the tool must not apply it
    ckpt = save_consolidated(model, str(tmp / "ckpt"))
    data = tmp / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t, "lang": lang}) + "\n" for t, lang in DOCS))
    return model, ckpt, str(data), tmp


def hand_loss(model: MoETransformer, budget: int | None = None) -> tuple[float, dict[str, tuple[int, float]]]:
    stream, labels = [], []
    for text, lang in DOCS:
        ids = list(text.encode()) + [256]
        stream += ids
        labels += [lang] * len(ids)
    if budget is not None:
        stream, labels = stream[:budget + 1], labels[:budget + 1]
    cfg = parse_model_config(dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32,
                                  moe_every=1),
                             dict(num_experts=4, top_k=2, d_ff=16, eval_capacity_factor=0.0))
    ref = MoETransformer(cfg).eval()
    ref.load_state_dict(model.state_dict())
    nll_sum, per_domain = 0.0, {}
    with torch.no_grad():
        for start in range(0, len(stream) - 1, S):
            chunk = torch.tensor(stream[start:start + S + 1])
            logits = ref(chunk[None, :-1]).logits_BSV[0]
            nll = F.cross_entropy(logits, chunk[1:], reduction="none")
            nll_sum += float(nll.sum())
            for j, value in enumerate(nll.tolist()):
                name = labels[start + 1 + j] or "(unlabelled)"
                n, s = per_domain.get(name, (0, 0.0))
                per_domain[name] = (n + 1, s + value)
    return nll_sum / (len(stream) - 1), per_domain


def run_tool(args: list[str], out) -> dict:
    assert load_tool("evaluate").main([*args, "--json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_loss_equals_hand_written_per_domain_sums(setup):
    model, ckpt, data, tmp = setup
    got = run_tool([ckpt, "--data", data, "--label-key", "lang", "--seq-len", str(S), "--batch", "3",
                    "--heatmap", str(tmp / "heat.png")], tmp / "r.json")
    loss, per_domain = hand_loss(model)
    assert got["tokens"] == sum(n for n, _ in per_domain.values())
    assert got["loss"] == pytest.approx(loss, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert set(got["domains"]) == set(per_domain) and got["domain_names"] == ["de", "en", "fr"]
    for name, (n, s) in per_domain.items():
        assert got["domains"][name]["tokens"] == n
        assert got["domains"][name]["loss"] == pytest.approx(s / n, abs=1e-5)
    combined = sum(d["tokens"] * d["loss"] for d in got["domains"].values()) / got["tokens"]
    assert combined == pytest.approx(got["loss"], abs=1e-6)
    for row in got["moe_layers"].values():
        assert row["dropped_fraction"] == 0.0  # dropless by default, whatever the checkpoint says
        assert 0.0 <= row["mi_domain_normalized"] <= 1.0
    assert (tmp / "heat.png").read_bytes()[:4] == b"\x89PNG"
    assert got["loss_sem"] > 0


def test_config_capacity_drops_and_changes_the_loss(setup):
    model, ckpt, data, tmp = setup
    got = run_tool([ckpt, "--data", data, "--seq-len", str(S), "--capacity", "config"], tmp / "c.json")
    assert max(row["dropped_fraction"] for row in got["moe_layers"].values()) > 0
    assert got["loss"] != pytest.approx(hand_loss(model)[0], abs=1e-5)


def test_token_budget(setup):
    model, ckpt, data, tmp = setup
    got = run_tool([ckpt, "--data", data, "--seq-len", str(S), "--tokens", "37"], tmp / "b.json")
    assert got["tokens"] == 37
    assert got["loss"] == pytest.approx(hand_loss(model, budget=37)[0], abs=1e-5)


def test_megatron_prefix_gives_the_jsonl_numbers(setup):
    from moe_dist.data.preprocess import preprocess_corpus
    from moe_dist.data.tokenizers import ByteTokenizer

    _, ckpt, data, tmp = setup
    prefix = str(tmp / "held_out")
    preprocess_corpus([data], prefix, ByteTokenizer(), label_key="lang")
    a = run_tool([ckpt, "--data", data, "--label-key", "lang", "--seq-len", str(S)], tmp / "j.json")
    b = run_tool([ckpt, "--data", prefix, "--seq-len", str(S)], tmp / "m.json")
    assert a["tokens"] == b["tokens"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    # unlabelled rows get no label in the sidecar either
    assert {k: v["tokens"] for k, v in b["domains"].items()} == {k: v["tokens"] for k, v in a["domains"].items()}


def test_windows_predict_every_token_once():
    docs = iter([([1, 2, 3, 256], 0), ([4, 5, 256], 1)])
    ws = list(windows(docs, 3, None))
    assert [w.tokens.tolist() for w in ws] == [[1, 2, 3, 256], [256, 4, 5, 256]]
    assert [w.domain_ids.tolist() for w in ws] == [[0, 0, 0, 0], [0, 1, 1, 1]]


def test_bad_input_exits_2(setup, tmp_path, capsys):
    _, ckpt, data, _ = setup
    tool = load_tool("evaluate")
    assert tool.main([ckpt, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert tool.main([ckpt, "--data", data, "--tokens", "-3"]) == 2
    assert tool.main([ckpt, "--data", data, "--seq-len", "999"]) == 2


def test_sequence_loss_sums_leave_padding_out():
    from moe_dist.evaluate.precision import sequence_loss_sums

    logits = torch.randn(3, 4, 7)
    targets = torch.randint(0, 7, (3, 4))
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tokens, sequences, total, squares = sequence_loss_sums(logits, targets, valid_BS=valid).tolist()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
    means = [nll[0].mean(), nll[1, :2].mean()]  # the padding-only row is no sequence
    assert (tokens, sequences) == (6.0, 2.0)
    assert math.isclose(total, float(sum(means)), rel_tol=1e-9)
    assert math.isclose(squares, float(sum(m * m for m in means)), rel_tol=1e-9)
    unmasked = sequence_loss_sums(logits, targets).tolist()
    assert unmasked[:2] == [12.0, 3.0]


def test_evaluation_padding_forward_is_in_no_routing_count():
    """A rank with fewer windows in the last round runs a masked one-token forward: its
    statistics count no token (before issue 22 it counted one routed token)."""
    cfg = parse_model_config(dict(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8),
                             dict(d_ff=16, num_experts=4, top_k=2))
    model = MoETransformer(cfg, seed=0).eval()
    tokens = torch.zeros(1, 1, dtype=torch.long)
    out = model(tokens, valid_BS=torch.zeros(1, 1, dtype=torch.bool))
    [(_, stats)] = out.moe_stats.items()
    assert stats["num_tokens"].item() == 0 and stats["tokens_per_expert"].sum().item() == 0
