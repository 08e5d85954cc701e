"""COMET's expert-mask projections are drawn from the model seed (train.seed) and not saved, so
every loader rebuilds the model with the seed of the run that wrote the checkpoint: evaluate and
generate compute the trained function, and init_from / load_consolidated into a model with
another seed are refused, naming both seeds."""

from __future__ import annotations

import pytest
import torch

from moe_dist.checkpoint import CheckpointError, load_consolidated, save_consolidated
from moe_dist.checkpoint.consolidated import model_seed
from moe_dist.common.config import ConfigError
from moe_dist.evaluate.loading import load_model
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.preflight.start import check_init_from

V, S = 50, 8
MODEL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=S)
MOE = dict(num_experts=4, d_ff=32, top_k=2, eval_capacity_factor=0.0, comet_active_fraction=0.25)


def cfg(**moe):
    return parse_model_config(dict(MODEL), {**MOE, **moe})


def tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_evaluate_and_generate_rebuild_the_masks_of_the_training_seed(tmp_path):
    model = MoETransformer(cfg(), seed=1234).eval()  # train.seed's default
    out = save_consolidated(model, str(tmp_path / "c"))
    loaded = load_model(out)
    assert loaded.model.seed == 1234
    torch.testing.assert_close(loaded.model(tokens()).logits_BSV, model(tokens()).logits_BSV, rtol=0, atol=0)
    # the same weights under seed 0's masks compute another function: what load_model did before
    other = MoETransformer(cfg(), seed=0).eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(tokens()).logits_BSV, model(tokens()).logits_BSV, atol=1e-4)


def test_loading_into_a_model_of_another_seed_is_refused_naming_both(tmp_path):
    out = save_consolidated(MoETransformer(cfg(), seed=7), str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match=r"drawn with seed 7 .*this model's with seed 3.*train.seed: 7"):
        load_consolidated(MoETransformer(cfg(), seed=3), out)
    load_consolidated(MoETransformer(cfg(), seed=7), out)
    with pytest.raises(ConfigError, match=r"train.init_from: .*moe_dist.json: its COMET expert masks .*seed 7"):
        check_init_from(out, cfg(), 3)
    check_init_from(out, cfg(), 7)


def test_without_comet_the_seed_does_not_matter(tmp_path):
    out = save_consolidated(MoETransformer(cfg(comet_active_fraction=None), seed=7), str(tmp_path / "c"))
    load_consolidated(MoETransformer(cfg(comet_active_fraction=None), seed=3), out)
    check_init_from(out, cfg(comet_active_fraction=None), 3)


def test_the_seed_of_a_run_config():
    assert model_seed({"train": {"seed": 99}, "model": {}}) == 99
    assert model_seed({"model": {}}) == 0  # saved without one: MoETransformer's default


def test_the_projections_stay_fp32_when_the_model_is_cast_to_bf16():
    """DeepSpeed's bf16 mode calls module.bfloat16(): a rounded matrix would pick other winners
    than the fp32 one evaluation and the exports draw."""
    model = MoETransformer(cfg(), seed=5)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("hidden_mask.v_eDF")}
    model.bfloat16()
    after = dict(model.named_buffers())
    assert before and all(after[n].dtype == torch.float32 and torch.equal(after[n], b) for n, b in before.items())
