"""Multi-token prediction (`model.mtp_layers: 1`, moe_dist/model/mtp.py): the MTP block's loss is
DeepSeek-V3's (written out here from its description, against the model's wiring), it joins the
training loss times mtp_loss_weight and trains the main model too, its MoE statistics and aux
losses come under layer index n_layers, and it changes nothing else: the main model's weights,
the logits, evaluation and generation are those of the same model without MTP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_dist.common.config import ConfigError
from moe_dist.model.config import parse_model_config
from moe_dist.model.generation import SamplingConfig, generate
from moe_dist.model.norm import rms_norm
from moe_dist.model.rotary import rotary_tables
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.layer import MoESideInputs

V, B, S, N_LAYERS = 97, 2, 12, 3


def make_cfg(mtp_layers: int = 1, weight: float = 0.3, **model):
    return parse_model_config(
        dict(dict(vocab_size=V, d_model=32, n_layers=N_LAYERS, n_heads=4, d_ff=48, max_seq_len=32, moe_every=1,
                  moe_offset=1, num_labels=3, mtp_layers=mtp_layers, mtp_loss_weight=weight, tie_embeddings=False),
             **model),
        dict(num_experts=4, d_ff=16, top_k=2, dropless=True, aux_loss=dict(switch=0.1, z_loss=0.01),
             router={"type": "topk", "score": "sigmoid", "renormalize": True, "expert_groups": 2,
                     "topk_groups": 1, "bias_balancing": True}))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:], torch.randint(-1, 3, (B, S), generator=g)


def test_mtp_loss_is_deepseek_v3s_and_joins_the_training_loss():
    model = MoETransformer(make_cfg(weight=0.25), seed=3)
    x, y, d = batch()
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.update(h=o))
    out = model(x, y, d)

    # Written out: at position t, [enorm(emb(token t+1)); hnorm(h_t)] -> eh_proj -> block -> own
    # norm -> the shared head, against token t+2, over positions 0..S-2.
    mtp = model.blocks[N_LAYERS]
    h = hidden["h"][:, :-1]
    e = model.embed(x[:, 1:])
    u = torch.cat([rms_norm(e, mtp.enorm.weight_D, 1e-5), rms_norm(h, mtp.hnorm.weight_D, 1e-5)], dim=-1)
    cos, sin = rotary_tables(S - 1, model.cfg.head_dim, model.cfg.rope_theta, x.device)
    z, moe_out = mtp(u @ mtp.eh_proj.weight.t(), cos, sin, MoESideInputs())
    logits = rms_norm(z, mtp.head_norm.weight_D, 1e-5) @ model.lm_head.weight.t()
    expected = F.cross_entropy(logits.reshape(-1, V), y[:, 1:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected)

    assert sorted(out.moe_stats) == [1, 2, N_LAYERS]
    assert out.moe_stats[N_LAYERS]["tokens_per_expert"].sum() == B * (S - 1) * 2
    assert out.moe_stats[N_LAYERS]["expert_label_counts"].sum() == (d[:, :-1] >= 0).sum() * 2
    torch.testing.assert_close(moe_out.aux_loss.detach(), out.moe_stats[N_LAYERS]["loss_switch"] * 0.1
                               + out.moe_stats[N_LAYERS]["loss_z_loss"] * 0.01)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + 0.25 * out.mtp_loss)
    without = MoETransformer(make_cfg(mtp_layers=0), seed=3)
    torch.testing.assert_close(out.aux_loss, without(x, y, d).aux_loss + moe_out.aux_loss)


def test_main_model_and_eval_are_unchanged_and_the_mtp_gradient_reaches_the_main_model():
    model, without = MoETransformer(make_cfg(), seed=3), MoETransformer(make_cfg(mtp_layers=0), seed=3)
    ours = dict(model.named_parameters())
    for name, p in without.named_parameters():
        torch.testing.assert_close(ours.pop(name), p)
    prefix = f"blocks.{N_LAYERS}."
    assert all(name.startswith(prefix) for name in ours)
    assert {f"{prefix}{n}" for n in ("enorm.weight_D", "hnorm.weight_D", "eh_proj.weight", "head_norm.weight_D",
                                     "attn_norm.weight_D", "ffn_norm.weight_D", "moe.router.gate.weight_ED",
                                     "moe.experts.w_in_EDI")} <= set(ours)
    assert [i for i, _ in model.moe_layers()] == [1, 2, N_LAYERS]

    x, y, d = batch()
    torch.testing.assert_close(model(x, y, d).logits_BSV, without(x, y, d).logits_BSV)
    out = model(x, y, d)
    out.mtp_loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through h
    assert model.embed.weight.grad.abs().sum() > 0  # through the embedding of token t+1
    assert model.blocks[N_LAYERS].moe.router.gate.weight_ED.grad.abs().sum() > 0

    model.eval()
    without.eval()
    ev = model(x, y, d)
    assert ev.mtp_loss is None and sorted(ev.moe_stats) == [1, 2]
    torch.testing.assert_close(ev.loss, without(x, y, d).loss)
    greedy = SamplingConfig(max_new_tokens=5)
    assert generate(model, [[5, 9, 3], [7]], greedy) == generate(without, [[5, 9, 3], [7]], greedy)


def test_mtp_block_follows_the_layer_pattern():
    """Layer n_layers of the pattern: MoE with moe_every 1 (DeepSeek-V3), dense where the pattern
    puts a dense layer there."""
    model = MoETransformer(make_cfg(moe_every=2, moe_offset=0), seed=0)  # layers 0, 2 MoE; 3 dense
    assert model.blocks[N_LAYERS].moe is None and model.blocks[N_LAYERS].ffn is not None
    x, y, d = batch()
    out = model(x, y, d)
    assert sorted(out.moe_stats) == [0, 2] and out.mtp_loss is not None


@pytest.mark.parametrize("model,match", [
    (dict(mtp_layers=2), r"model.mtp_layers is 2, but only 0 or 1 is implemented"),
    (dict(mtp_layers=-1), r"model.mtp_layers must be an integer >= 0, got -1"),
    (dict(mtp_loss_weight=-0.1), r"model.mtp_loss_weight must be a number >= 0, got -0.1"),
])
def test_bad_mtp_settings_are_refused(model, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_config(dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, **model))
