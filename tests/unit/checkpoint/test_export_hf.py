"""export-hf for what Mixtral cannot express: every research router (and a topk model with dense
layers, shared GELU experts, no renormalization and an active selection bias) exports as the
self-contained custom architecture, loads with trust_remote_code and gives moe_dist's logits;
router statistics buffers (EMAs, projections, biases) are populated first so the eval paths
that read them are exercised. SentencePiece checkpoints get tokenizer files that transformers
loads. COMET's expert masks are computed from the projections the export writes. (The Mixtral
path on a real training checkpoint: tests/distributed/test_checkpoint_roundtrip.py.)"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil

import pytest
import torch

from moe_dist.checkpoint import CheckpointError, export_hf, save_consolidated
from moe_dist.checkpoint.hf import remote_code
from moe_dist.checkpoint.hf.exporter import mixtral_blockers
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer

transformers = pytest.importorskip("transformers")

V, S, E = 61, 12, 4
MODEL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=24, max_seq_len=S)
MOE = dict(num_experts=E, d_ff=16, top_k=2, eval_capacity_factor=0.0)

CASES = {
    "inhibition-subtractive": ({}, dict(router={"type": "inhibition", "momentum": 0.5})),
    "inhibition-divisive": ({}, dict(router={"type": "inhibition", "mode": "divisive", "momentum": 0.5,
                                             "renormalize": True})),
    "inhibition-rectified": ({}, dict(router={"type": "inhibition", "mode": "rectified", "alpha": 0.5})),
    "inhibition-subspace": ({}, dict(router={"type": "inhibition", "mode": "subspace", "rank": 2,
                                             "refresh_every": 1, "bias_balancing": True})),
    "fixed_projection-hidden": ({}, dict(router={"type": "fixed_projection", "seed": 5})),
    "fixed_projection-embedding-centered": ({}, dict(router={"type": "fixed_projection", "source": "embedding",
                                                             "center": True, "weights": "softmax",
                                                             "bias_balancing": True})),
    "attentive": ({}, dict(router={"type": "attentive", "hidden": 8, "activation": "gelu"})),
    # Token-id tables, taken from the checkpoint (build() shuffles them away from what a seed gives).
    "hash": ({}, dict(router={"type": "hash", "seed": 4})),
    # DeepSeek-V4's layout: hash layers first, learned top-k after (and a dense layer between).
    "hash_layers-topk-dense": (dict(n_layers=4, moe_every=1, moe_offset=1),
                               dict(hash_layers=2, hash_router={"type": "hash", "seed": 2},
                                    router={"type": "topk", "renormalize": True})),
    "topk-dense-shared-gelu-bias": (dict(n_layers=3, moe_every=2, activation="gelu", tie_embeddings=False),
                                    dict(activation="gelu", num_shared_experts=1,
                                         router={"type": "topk", "bias_balancing": True})),
    # Attention and MoE options beside research routers: no native class takes these either.
    "inhibition-gqa-headnorm-qkvbias": (dict(n_kv_heads=2, qk_norm="head", qkv_bias=True),
                                        dict(router={"type": "inhibition", "momentum": 0.5, "score": "sigmoid",
                                                     "scale": 1.5})),
    "inhibition-divisive-score_after_topk": ({}, dict(router={"type": "inhibition", "mode": "divisive",
                                                              "momentum": 0.5, "score_after_topk": True})),
    "attentive-mqa-fullnorm-headdim": (dict(n_kv_heads=1, qk_norm="full", head_dim=12),
                                       dict(router={"type": "attentive", "hidden": 8})),
    "fixed_projection-gated-shared-width": ({}, dict(num_shared_experts=1, shared_d_ff=20, shared_gate=True,
                                                     router={"type": "fixed_projection", "seed": 5})),
    "topk-dense-sigmoid-scaled": (dict(n_layers=3, moe_every=2, n_kv_heads=2),
                                  dict(router={"type": "topk", "score": "sigmoid", "scale": 2.5,
                                               "bias_balancing": True})),
    "topk-dense-score_after_topk-scaled": (dict(n_layers=3, moe_every=2, moe_offset=1, head_dim=4),
                                           dict(num_shared_experts=2, shared_gate=True,
                                                router={"type": "topk", "score_after_topk": True, "scale": 2.5})),
    # COMET's mask inside experts, projections drawn from the model seed (3, not the default 0):
    # on SwiGLU's product and on GELU, beside a shared expert it never masks.
    "inhibition-comet-swiglu": ({}, dict(comet_active_fraction=0.25, router={"type": "inhibition", "momentum": 0.5})),
    "fixed_projection-comet-gelu-shared": (dict(activation="gelu"),
                                           dict(activation="gelu", num_shared_experts=1, comet_active_fraction=0.5,
                                                router={"type": "fixed_projection", "seed": 5})),
}


def build(model_kw: dict, moe_kw: dict) -> MoETransformer:
    """A model whose router buffers hold non-trivial state, in eval mode."""
    model = MoETransformer(parse_model_config({**MODEL, **model_kw}, {**MOE, **moe_kw}), seed=3)
    g = torch.Generator().manual_seed(11)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # training forwards fold batch statistics into the routers' EMAs
            model(torch.randint(0, V, (4, S), generator=g))
        for _, moe in model.moe_layers():
            if getattr(moe.router.cfg, "bias_balancing", False):
                moe.router.selection_bias_E.copy_(torch.randn(E, generator=g) * 0.2)
            if hasattr(moe.router, "table_VK"):
                moe.router.table_VK.copy_(moe.router.table_VK[torch.randperm(V, generator=g)])
        for p in model.parameters():  # norm weights and biases away from their ones / zeros
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def imported_packages(folder: str) -> set[str]:
    """Top-level packages the exported Python files import (relative imports excluded)."""
    roots = set()
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                for node in ast.walk(ast.parse(f.read())):
                    if isinstance(node, ast.Import):
                        roots |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        roots.add(node.module.split(".")[0])
    return roots


def tokens() -> torch.Tensor:
    return torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_export_loads_with_remote_code_and_matches(tmp_path, case):
    model = build(*CASES[case])
    with torch.no_grad():
        expected = model(tokens()).logits_BSV
    save_consolidated(model, str(tmp_path / "consolidated"))
    out = str(tmp_path / f"hf_{case.replace('-', '_')}")
    result = export_hf(str(tmp_path / "consolidated"), out, progress=False)
    assert result.architecture == "custom" and result.reasons == mixtral_blockers(model.cfg, model.state_dict())
    assert result.reasons
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_dist.MoEDistForCausalLM"
    assert imported_packages(out) <= {"math", "torch", "transformers"}  # no moe_dist: loads where it is absent
    shipped = {n for n in os.listdir(os.path.dirname(remote_code.__file__)) if n.endswith(".py")}
    assert {n for n in os.listdir(out) if n.endswith(".py")} == shipped - {"__init__.py"}
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = hf(tokens()).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_custom_export_generates_greedily(tmp_path):
    model = build(*CASES["inhibition-subtractive"])
    save_consolidated(model, str(tmp_path / "consolidated"))
    out = str(tmp_path / "hf_generate")
    export_hf(str(tmp_path / "consolidated"), out, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    prompt = tokens()[:1, :4]
    generated = hf.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits_BSV[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_mixtral_is_refused_with_the_reasons_and_nothing_written(tmp_path):
    model = build(*CASES["attentive"])
    save_consolidated(model, str(tmp_path / "consolidated"))
    with pytest.raises(CheckpointError, match=r"Mixtral cannot express .*router type 'attentive'"):
        export_hf(str(tmp_path / "consolidated"), str(tmp_path / "out"), architecture="mixtral", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["consolidated"]


def test_mixtral_blockers_name_each_difference():
    base = build({}, dict(router={"type": "topk", "renormalize": True, "bias_balancing": True}))
    assert mixtral_blockers(base.cfg, {k: torch.zeros_like(v) if k.endswith("selection_bias_E") else v
                                       for k, v in base.state_dict().items()}) == []
    assert mixtral_blockers(base.cfg, base.state_dict()) == [
        "the aux-loss-free selection bias is nonzero; Mixtral selects by probability alone"]
    model, _ = CASES["topk-dense-shared-gelu-bias"]
    other = build(model, dict(activation="gelu", num_shared_experts=1, top_k=1, router={"type": "topk"}))
    assert mixtral_blockers(other.cfg, other.state_dict()) == [
        "not every layer is an MoE layer (moe_every 2, moe_offset 0)",
        "experts use 'gelu'; Mixtral's experts are SwiGLU",
        "1 shared expert(s); Mixtral has none",
        "router.renormalize is false with top_k 1 (weight p, not 1 as in Mixtral)"]


# ---- tokenizer files ---------------------------------------------------------------------------

TEXTS = [f"Dokument {i}: Über {i * 7} Äpfel\n\tand {i % 5} pears, naïve café." for i in range(60)]
PROBES = ["Dokument 3: Über 21 Äpfel", "hello world\n\tnew line", "Zwölf Boxkämpfer jagen Viktor 😀 €",
          "x  y   z", "a\tb\nc 1234567"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from moe_dist.data.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("sp")
    (root / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    return train_sentencepiece([str(root / "corpus.txt")], str(root / "tok"), vocab_size=300,
                               cache_dir=str(root / "hf"))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _sp_checkpoint(root, sp_model: str, recorded_sha: str) -> str:
    """A consolidated checkpoint trained (so its metadata says) with the SentencePiece model at
    `sp_model` whose digest was `recorded_sha`."""
    root.mkdir(exist_ok=True)
    model = build({"vocab_size": 300}, dict(router={"type": "topk", "renormalize": True}))
    path = str(root / "consolidated")
    save_consolidated(model, path, data={"tokenizer": {"kind": "sentencepiece", "model": sp_model}})
    with open(os.path.join(path, "moe_dist.json")) as f:
        meta = json.load(f)
    meta["tokenizer"] = {"kind": "sentencepiece", "unique_identifiers": {"sha256": recorded_sha}}
    with open(os.path.join(path, "moe_dist.json"), "w") as f:
        json.dump(meta, f)
    return path


def test_sentencepiece_tokenizer_is_exported(tmp_path, sp_model):
    import sentencepiece

    out = str(tmp_path / "hf_tok")
    result = export_hf(_sp_checkpoint(tmp_path, sp_model, _sha256(sp_model)), out, progress=False)
    assert result.architecture == "mixtral" and result.tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in PROBES:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())


def test_tokenizer_model_is_checked_and_can_be_pointed_at(tmp_path, sp_model):
    wrong = _sp_checkpoint(tmp_path / "wrong", sp_model, "0" * 64)
    with pytest.raises(CheckpointError, match=r"tok\.model' has sha256 .* trained with one whose sha256 is 0000"):
        export_hf(wrong, str(tmp_path / "out"), progress=False)
    moved = str(tmp_path / "moved.model")
    shutil.copyfile(sp_model, moved)
    gone = _sp_checkpoint(tmp_path / "gone", str(tmp_path / "deleted.model"), _sha256(sp_model))
    with pytest.raises(CheckpointError, match="deleted.model', which does not exist here; pass --tokenizer-model"):
        export_hf(gone, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
    export_hf(gone, str(tmp_path / "out"), tokenizer_model=moved, progress=False)
    assert _sha256(str(tmp_path / "out" / "tokenizer.model")) == _sha256(sp_model)
