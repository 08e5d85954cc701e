"""`upcycle` from a local dense Hugging Face directory (Llama, Qwen2, Qwen3; tiny random models
built from transformers' own config classes, nothing downloaded): the upcycled moe_dist model's
logits equal transformers' dense model's at step 0, for full copies and for slices, and the
directory's tokenizer becomes the run's `tokenizer: {kind: hf}`. Needs the HF reader
(moe_dist.checkpoint.hf.importer, the hf-convert branch)."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("moe_dist.checkpoint.hf.importer")

from tests.harness.tiny_hf_tokenizer import build_tokenizer_dir  # noqa: E402

from moe_dist.checkpoint import cli, load_consolidated  # noqa: E402
from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint  # noqa: E402
from moe_dist.checkpoint.files import CheckpointError  # noqa: E402
from moe_dist.checkpoint.upcycle import router_has_scale, upcycle  # noqa: E402
from moe_dist.model.transformer import MoETransformer  # noqa: E402

VOCAB, SEQ = 321, 16  # the tiny tokenizer's len()
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, num_hidden_layers=2, intermediate_size=40)
DENSE = {"LlamaForCausalLM": ("LlamaConfig", dict(tie_word_embeddings=False)),
         "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True)),
         "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False))}


def build_hf(cls_name: str, path: str):
    import transformers

    config_cls, extra = DENSE[cls_name]
    model = getattr(transformers, cls_name)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a spread that makes every FFN matter to the logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    build_tokenizer_dir(path)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("cls_name", sorted(DENSE))
@pytest.mark.parametrize("E, K, G", [(4, 2, 1), (4, 2, 2)])
def test_upcycled_hf_model_computes_transformers_logits(tmp_path, cls_name, E, K, G):
    hf_dir = str(tmp_path / "hf")
    hf = build_hf(cls_name, hf_dir)
    out = str(tmp_path / "moe")
    scale = "router" if router_has_scale() else "output"
    assert cli.main(["upcycle", hf_dir, out, "--num-experts", str(E), "--top-k", str(K), "--granularity", str(G),
                     "--slice-scale", scale, "--quiet"]) == 0
    ckpt = ConsolidatedCheckpoint.open(out)
    assert ckpt.meta["source"]["kind"] == "hf"
    assert ckpt.config["data"]["tokenizer"]["kind"] == "hf" and ckpt.config["data"]["tokenizer"]["path"] == hf_dir
    model = MoETransformer(ckpt.model_cfg)
    load_consolidated(model, out)
    with torch.no_grad():
        ours, theirs = model.eval()(tokens()).logits_BSV, hf(tokens()).logits
    assert theirs.abs().max() > 1.0
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_an_hf_moe_model_is_refused(tmp_path):
    import transformers

    config = transformers.MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2})
    path = str(tmp_path / "mixtral")
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path!r} is already an MoE model (moe.num_experts 4")):
        upcycle(path, str(tmp_path / "out"), 8, 2, progress=False)
    assert not os.path.exists(tmp_path / "out")
