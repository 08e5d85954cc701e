"""The decoder-only MoE transformer as plain single-process PyTorch: shapes, causality, loss
terms, routing stream and labels, activation checkpointing, and weights that do not depend on
the expert-parallel size."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.parallel.groups import ParallelGroups

V, B, S = 97, 2, 12


def make_cfg(moe: dict | None = None, **model_overrides):
    model = dict(dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=32,
                      moe_every=2, moe_offset=1, num_labels=3), **model_overrides)
    return parse_model_config(model, dict(num_experts=4, d_ff=16, top_k=2, dropless=True, **(moe or {})))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    domains = torch.randint(-1, 3, (B, S), generator=g)
    return tokens[:, :-1], tokens[:, 1:], domains


def test_forward_shapes_and_losses():
    model = MoETransformer(make_cfg(), seed=3)
    x, y, d = batch()
    out = model(x, y, d)
    assert out.logits_BSV.shape == (B, S, V)
    # Small init: the first prediction is close to uniform.
    assert abs(float(out.lm_loss.detach()) - math.log(V)) < 0.1
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert sorted(out.moe_stats) == [1, 3]
    stats = out.moe_stats[1]
    assert stats["tokens_per_expert"].sum() == B * S * 2  # top-2, pre-drop
    assert stats["expert_label_counts"].shape == (4, 3)
    assert "mi_label_normalized" in stats and "loss_switch" in stats
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = MoETransformer(make_cfg(), seed=3).eval()
    x, _, _ = batch()
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % V
    a, b = model(x).logits_BSV, model(x2).logits_BSV
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_and_untied_embeddings():
    tied = MoETransformer(make_cfg(), seed=0)
    untied = MoETransformer(make_cfg(tie_embeddings=False), seed=0)
    assert tied.lm_head is None
    assert untied.lm_head.weight.shape == (V, 32)
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + V * 32


def test_no_labels_means_no_label_statistics():
    model = MoETransformer(make_cfg(num_labels=0), seed=0)
    x, y, d = batch()
    assert "expert_label_counts" not in model(x, y, d).moe_stats[1]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ref = MoETransformer(make_cfg(), seed=5)
    ckpt = MoETransformer(make_cfg(activation_checkpointing=True), seed=5)
    x, y, d = batch(1)
    out_ref, out = ref(x, y, d), ckpt(x, y, d)
    out_ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss)
    for (name, p), q in zip(ckpt.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_routing_stream_starts_at_detached_embeddings_and_is_handed_on(monkeypatch):
    seen = []
    original = MoELayer.forward

    def spy(self, x, side=None):
        seen.append((self.layer_index, side.stream_TD))
        out = original(self, x, side)
        if self.layer_index == 1:  # pretend layer 1's router transformed the stream
            out.stream = side.stream_TD * 2
        return out

    monkeypatch.setattr(MoELayer, "forward", spy)
    model = MoETransformer(make_cfg(), seed=0)
    x, y, d = batch()
    model(x, y, d)
    (first, s1), (second, s3) = seen
    assert (first, second) == (1, 3)
    emb = model.embed(x).reshape(B * S, -1)
    torch.testing.assert_close(s1, emb)
    assert not s1.requires_grad
    torch.testing.assert_close(s3, 2 * emb)


def test_side_inputs_are_built_once_and_handed_on_with_only_the_stream_changed(monkeypatch):
    seen = []
    original = MoELayer.forward

    def spy(self, x, side=None):
        seen.append(side)
        out = original(self, x, side)
        out.stream = side.stream_TD + 1.0  # a new stream from every layer
        return out

    monkeypatch.setattr(MoELayer, "forward", spy)
    model = MoETransformer(make_cfg(), seed=0)
    x, y, d = batch()
    model(x, y, d, capacity_groups=2)
    first, second = seen
    assert torch.equal(first.labels_T, d.reshape(-1)) and second.labels_T is first.labels_T
    assert (first.num_labels, first.capacity_groups) == (second.num_labels, second.capacity_groups) == (3, 2)
    torch.testing.assert_close(second.stream_TD, first.stream_TD + 1.0)

    seen.clear()
    MoETransformer(make_cfg(num_labels=0), seed=0)(x, y, d)
    assert seen[0].labels_T is None and seen[0].num_labels == 0 and seen[0].capacity_groups == 1


def test_side_inputs_defaults_and_errors():
    side = MoESideInputs()
    assert (side.labels_T, side.num_labels, side.capacity_groups, side.stream_TD) == (None, 0, 1, None)
    assert side.handed_on(None) is side
    stream = torch.ones(3, 2)
    assert side.handed_on(stream).stream_TD is stream and side.stream_TD is None
    with pytest.raises(ValueError, match="capacity_groups must be an integer >= 1, got 0"):
        MoESideInputs(capacity_groups=0)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 0, got -1"):
        MoESideInputs(num_labels=-1)


def test_weights_do_not_depend_on_ep_size():
    """Dense weights are identical and each rank holds its slice of the same global experts."""
    ref = MoETransformer(make_cfg(), seed=7)
    ref_params = dict(ref.named_parameters())
    for rank in range(2):
        groups = ParallelGroups(world_size=2, rank=rank, ep_size=2)  # construction needs no collective
        model = MoETransformer(make_cfg(moe=dict(ep_size=2)), seed=7, groups=groups)
        for name, p in model.named_parameters():
            expected = ref_params[name]
            if ".experts." in name:
                expected = expected[rank * 2:(rank + 1) * 2]
            torch.testing.assert_close(p, expected, rtol=0, atol=0, msg=lambda m: f"{name} rank {rank}: {m}")


def test_different_seeds_give_different_dense_weights():
    a, b = MoETransformer(make_cfg(), seed=0), MoETransformer(make_cfg(), seed=1)
    assert not torch.equal(a.embed.weight, b.embed.weight)


def test_sequence_longer_than_max_seq_len_is_an_error():
    model = MoETransformer(make_cfg(max_seq_len=8), seed=0)
    with pytest.raises(ValueError, match=r"sequence length \(12\) exceeds model.max_seq_len \(8\)"):
        model(batch()[0])


def test_bf16_forward_keeps_a_float32_loss():
    model = MoETransformer(make_cfg(), seed=0).to(torch.bfloat16)
    x, y, d = batch()
    out = model(x, y, d)
    assert out.logits_BSV.dtype == torch.bfloat16
    assert out.lm_loss.dtype == torch.float32
    assert abs(float(out.lm_loss.detach()) - math.log(V)) < 0.2
