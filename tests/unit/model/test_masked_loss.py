"""The model's padding mask (`valid_BS`): the LM loss is the mean over real positions, equal to
the loss of the same sequences without their (trailing) padding; padding is in no routing
statistic; and a capacity-groups reference weighs each group (rank) equally."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_dist.model.config import ModelConfig
from moe_dist.model.transformer import MoETransformer, masked_lm_loss
from moe_dist.moe.config import MoEConfig

V, S = 97, 12


def _model() -> MoETransformer:
    # Dropless: a token's routing then does not depend on the other tokens of its batch.
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, moe_every=2,
                      moe_offset=1, moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, dropless=True))
    return MoETransformer(cfg, seed=3)


def test_masked_lm_loss_equals_the_unpadded_sequences_loss():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (2, S + 1), generator=gen)
    length = 7  # row 1 has 7 real inputs with real targets; the rest is padding
    valid = torch.ones(2, S, dtype=torch.bool)
    valid[1, length:] = False
    tokens[1, length + 1:] = 0  # padding token ids
    out = model(tokens[:, :-1], tokens[:, 1:], valid_BS=valid)

    nll_sum, count = 0.0, 0
    for row, n in ((0, S), (1, length)):
        alone = model(tokens[row:row + 1, :n], tokens[row:row + 1, 1:n + 1])
        nll_sum += alone.lm_loss.item() * n
        count += n
    torch.testing.assert_close(out.lm_loss.item(), nll_sum / count, rtol=1e-5, atol=1e-6)
    unmasked = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(unmasked.lm_loss.item() - out.lm_loss.item()) > 1e-3  # the padding would count
    [(_, stats)] = out.moe_stats.items()
    assert stats["num_tokens"].item() == S + length
    assert stats["tokens_per_expert"].sum().item() == 2 * (S + length)


def test_masked_lm_loss_weighs_capacity_groups_equally():
    logits = torch.randn(4, 3, 5)
    targets = torch.randint(0, 5, (4, 3))
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    group0 = nll[:2][valid[:2]].mean()
    group1 = nll[2:][valid[2:]].mean()
    torch.testing.assert_close(masked_lm_loss(logits, targets, valid, num_groups=2), (group0 + group1) / 2)
    torch.testing.assert_close(masked_lm_loss(logits, targets, valid), nll[valid].mean())
