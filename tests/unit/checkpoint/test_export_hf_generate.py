"""Exports that behave like Hugging Face models in `generate`: tools/generate.py's greedy output
equals transformers' `generate` on the export (Mixtral and remote code, also with COMET's expert
masks) for a left-padded batch running past max_seq_len; the remote-code model's KV cache
(multi-head, grouped-query with q/k norms and q/k/v bias, and COMET-masked experts) equals
recomputation and its right padding leaves real tokens' logits alone; exported tokenizers load
with AutoTokenizer without any input, have a pad token and pad a batch; generation_config names
eos and pad; the quickstart config exports as Mixtral."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from tests.harness import REPO, load_tool

from moe_dist.checkpoint import export_hf, save_consolidated
from moe_dist.checkpoint.hf.exporter import mixtral_blockers
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer

transformers = pytest.importorskip("transformers")

PROMPTS = ["abcab cab", "x"]
NEW = 14  # prompt 9 + 14 > max_seq_len 16
# kind: (model options, moe options, the architecture `auto` exports). custom_gqa: the remote
# code's grouped key/value heads in the cache, with q/k norms and q/k/v bias (Qwen3 has no bias,
# Qwen2 no norm). custom_comet: COMET's expert masks of the model seed (8), which
# tools/generate.py redraws from the checkpoint and the export carries.
KINDS = {"custom": (dict(moe_every=2), {}, "custom"), "mixtral": (dict(moe_every=1), {}, "mixtral"),
         "custom_gqa": (dict(moe_every=2, n_heads=4, n_kv_heads=2, qk_norm="head", qkv_bias=True), {},
                        "custom"),
         "custom_comet": (dict(moe_every=2), dict(comet_active_fraction=0.25), "custom")}


def build(kind: str) -> MoETransformer:
    cfg = parse_model_config({"vocab_size": 257, "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 48,
                              "max_seq_len": 16, **KINDS[kind][0]},
                             {"num_experts": 4, "top_k": 2, "d_ff": 16, "router": {"type": "topk", "renormalize": True},
                              **KINDS[kind][1]})
    model = MoETransformer(cfg, seed=8).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than init: decisive logits, no near-ties in greedy
        for name, p in model.named_parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
            if name.endswith(".bias"):  # zero at init, so an ignored bias would go unnoticed
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = save_consolidated(build(request.param), str(tmp / "ckpt"))
    result = export_hf(ckpt, str(tmp / "hf"), progress=False)
    assert result.architecture == KINDS[request.param][2] and result.tokenizer
    return KINDS[request.param][2], ckpt, str(tmp / "hf")


def load_hf(out: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)


def test_generate_tool_equals_hf_generate_on_a_left_padded_batch(exported, capsys):
    _, ckpt, out = exported
    hf, tok = load_hf(out)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert batch.attention_mask[1].tolist()[:-1] == [0] * (batch.input_ids.shape[1] - 1)  # left padding
    with torch.no_grad():
        got = hf.generate(**batch, max_new_tokens=NEW, do_sample=False)
    hf_new = [row[batch.input_ids.shape[1]:].tolist() for row in got]
    args = [ckpt, "--max-new-tokens", str(NEW), "--json", "--no-stop-at-eod"]
    assert load_tool("generate").main([*args, *[a for p in PROMPTS for a in ("--prompt", p)]]) == 0
    ours = [r["ids"] for r in json.loads(capsys.readouterr().out)]
    assert ours == hf_new
    assert ours[0] != ours[1] and all(len(ids) == NEW for ids in ours)


def test_remote_code_cache_and_padding(exported):
    kind, _, out = exported
    if kind != "custom":
        pytest.skip("transformers' own Mixtral")
    hf, tok = load_hf(out)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        cached = hf.generate(**batch, max_new_tokens=NEW, do_sample=False, use_cache=True)
        recomputed = hf.generate(**batch, max_new_tokens=NEW, do_sample=False, use_cache=False)
        assert torch.equal(cached, recomputed)
        for i, p in enumerate(PROMPTS):  # each prompt alone continues as in the batch
            alone = tok([p], return_tensors="pt")
            row = hf.generate(**alone, max_new_tokens=NEW, do_sample=False)[0, alone.input_ids.shape[1]:]
            assert torch.equal(row, cached[i, batch.input_ids.shape[1]:])
        right = tok(PROMPTS, padding=True, padding_side="right", return_tensors="pt")
        logits = hf(**right).logits
        for i, p in enumerate(PROMPTS):
            ids = tok([p], return_tensors="pt").input_ids
            torch.testing.assert_close(logits[i, :ids.shape[1]], hf(ids).logits[0], rtol=1e-5, atol=1e-5)


def test_tokenizer_loads_without_input_and_pads(exported):
    _, _, out = exported
    code = ("import sys, transformers; t = transformers.AutoTokenizer.from_pretrained(sys.argv[1], "
            "trust_remote_code=True); b = t(['ab', 'abcd'], padding=True); print(t.pad_token_id, b['input_ids'])")
    proc = subprocess.run([sys.executable, "-c", code, out], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "256" and "[[256, 256, 97, 98], [97, 98, 99, 100]]" in proc.stdout
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (256, 256)


def test_sentencepiece_remote_code_tokenizer_loads_without_input(tmp_path):
    from moe_dist.data.tokenizer_training import train_sentencepiece

    (tmp_path / "c.txt").write_text("\n".join(f"line {i} of some text, more words {i * 3}" for i in range(80)))
    sp = train_sentencepiece([str(tmp_path / "c.txt")], str(tmp_path / "tok"), vocab_size=300,
                             cache_dir=str(tmp_path / "datasets_cache"))
    cfg = parse_model_config({"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 48,
                              "max_seq_len": 16, "moe_every": 2}, {"num_experts": 4, "top_k": 2, "d_ff": 16})
    ckpt = save_consolidated(MoETransformer(cfg).eval(), str(tmp_path / "ckpt"),
                             data={"tokenizer": {"kind": "sentencepiece", "model": sp}})
    out = str(tmp_path / "hf")
    assert export_hf(ckpt, out, progress=False).architecture == "custom"
    code = ("import sys, transformers; t = transformers.AutoTokenizer.from_pretrained(sys.argv[1], "
            "trust_remote_code=True); b = t(['line 1', 'more words of text'], padding=True); "
            "print(t.pad_token_id == t.eos_token_id, b['attention_mask'][0][0])")
    proc = subprocess.run([sys.executable, "-c", code, out], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "0"]


def test_quickstart_config_exports_as_mixtral():
    with open(os.path.join(REPO, "configs/tiny_cpu.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["moe"]["ep_size"] = 1
    model = MoETransformer(parse_model_config(raw["model"], raw["moe"]))
    assert mixtral_blockers(model.cfg, model.state_dict()) == []
