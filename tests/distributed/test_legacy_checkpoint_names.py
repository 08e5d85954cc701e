"""Checkpoints written before the parameters' rename (issue 20: `w_in_eDF` -> `w_in_EDI`, ...)
still load, resume and convert, and compute what they computed when written.

The fixture (tests/fixtures/legacy_names/README.md) was written by the pre-rename tree, with the
logits and losses that tree saw: a ZeRO-1 training checkpoint (EP 2 on 2 ranks, attentive
routers, SwiGLU experts and a dense SwiGLU layer) and a consolidated checkpoint (subspace
inhibition routers). Every read path migrates the names (moe_dist/moe/legacy_names.py); every
write uses today's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tests.harness.train import REPO, run_deepspeed_ranks

from moe_dist.checkpoint import consolidate, load_consolidated, reshard
from moe_dist.checkpoint import summarize
from moe_dist.checkpoint.consolidated import open_checkpoint
from moe_dist.checkpoint.training import TrainingCheckpoint, read_zero_state
from moe_dist.checkpoint.training.layout import experts_file, tag_for_step
from moe_dist.evaluate.loading import load_model
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.legacy_names import LEGACY_NAMES, current_name, migrate_keys

FIXTURE = os.path.join(REPO, "tests", "fixtures", "legacy_names")
TRAINING, CONSOLIDATED = os.path.join(FIXTURE, "attentive"), os.path.join(FIXTURE, "inhibition")
LOGITS = {TRAINING: "attentive_logits.pt", CONSOLIDATED: "inhibition_logits.pt"}
OLD, NEW = set(LEGACY_NAMES), set(LEGACY_NAMES.values())


def tokens() -> torch.Tensor:
    """The batch the fixture's logits were recorded on (make.py)."""
    return torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(7))


def recorded_logits(path: str) -> torch.Tensor:
    return torch.load(os.path.join(FIXTURE, LOGITS[path]))


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens()).logits_BSV


def leaves(names) -> set[str]:
    return {n.rpartition(".")[2] for n in names}


def expected() -> dict:
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        return json.load(f)


def test_the_fixture_holds_every_old_name_and_each_maps_to_a_parameter_of_today():
    """The fixture tests every rename, and the map's targets are what today's modules name."""
    stored = set(TrainingCheckpoint.open(TRAINING).main["module"])  # migrated as read
    with safe_open(os.path.join(CONSOLIDATED, "model.safetensors"), "pt") as f:
        raw = set(f.keys())
    raw |= set(torch.load(os.path.join(TRAINING, tag_for_step(2), "mp_rank_00_model_states.pt"),
                          weights_only=False)["module"])
    assert leaves(raw) >= OLD, f"the fixture lacks {sorted(OLD - leaves(raw))}"
    assert not leaves(stored) & OLD
    built = set(load_model(TRAINING).model.state_dict()) | set(load_model(CONSOLIDATED).model.state_dict())
    assert leaves(built) >= NEW and not leaves(built) & OLD


def test_a_key_is_renamed_by_its_last_component_and_both_names_at_once_are_refused():
    assert current_name("model.blocks.1.moe.experts.w_in_eDF") == "model.blocks.1.moe.experts.w_in_EDI"
    assert current_name("w_in_DF") == "w_in_DI"
    assert current_name("blocks.0.ffn.w_out_FD") == "blocks.0.ffn.w_out_FD"
    assert current_name("blocks.0.w_in_DF.bias") == "blocks.0.w_in_DF.bias"  # a module path is no key
    assert list(migrate_keys({"b.probes_EHD": 1, "a": 2, "c.basis_DR": 3}, "x")) == ["b.probes_EJD", "a", "c.basis_DZ"]
    with pytest.raises(ValueError, match=r"x holds both 'e.w_in_eDF' .* and 'e.w_in_EDI'"):
        migrate_keys({"e.w_in_eDF": 1, "e.w_in_EDI": 2}, "x")


@pytest.mark.parametrize("path", [TRAINING, CONSOLIDATED], ids=["training", "consolidated"])
def test_it_loads_for_evaluation_with_the_logits_it_was_written_with(path):
    torch.testing.assert_close(logits_of(load_model(path).model), recorded_logits(path), rtol=1e-6, atol=1e-6)


def test_load_state_dict_and_load_consolidated_migrate_old_names():
    loaded = load_model(CONSOLIDATED)
    raw = load_file(os.path.join(CONSOLIDATED, "model.safetensors"))
    assert leaves(raw) & OLD
    fresh = MoETransformer(loaded.model.cfg, seed=loaded.model.seed)
    fresh.load_state_dict(raw, strict=True)  # the model's pre-hook
    torch.testing.assert_close(logits_of(fresh), recorded_logits(CONSOLIDATED), rtol=1e-6, atol=1e-6)
    again = MoETransformer(loaded.model.cfg, seed=loaded.model.seed)
    load_consolidated(again, CONSOLIDATED)
    torch.testing.assert_close(logits_of(again), recorded_logits(CONSOLIDATED), rtol=1e-6, atol=1e-6)
    both = {**raw, "blocks.1.moe.experts.w_in_EDI": raw["blocks.1.moe.experts.w_in_eDF"]}
    with pytest.raises(ValueError, match=r"holds both '\S+w_in_eDF' .* and '\S+w_in_EDI'"):
        fresh.load_state_dict(both, strict=True)


def test_inspect_counts_buffers_under_their_new_names():
    """The consolidated metadata lists the buffers by their old names; `inspect` must still
    tell them from parameters."""
    for path in (TRAINING, CONSOLIDATED):
        model = load_model(path).model
        summary = summarize(open_checkpoint(path))
        assert summary["parameters_total"] == sum(p.numel() for p in model.parameters()), path


@pytest.mark.parametrize("master_weights", [False, True], ids=["module", "master"])
def test_consolidate_writes_todays_names_and_the_same_function(tmp_path, master_weights):
    out = consolidate(TRAINING, str(tmp_path / "c"), master_weights=master_weights, progress=False)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert leaves(names) & NEW and not leaves(names) & OLD
    torch.testing.assert_close(logits_of(load_model(out).model), recorded_logits(TRAINING), rtol=1e-6, atol=1e-6)


def test_the_zero_reader_names_the_optimizer_state_by_todays_names():
    ckpt = TrainingCheckpoint.open(TRAINING)
    zero = read_zero_state(ckpt, progress=False)
    module = ckpt.module_state(progress=False)
    assert set(zero.master) == {n for n, _ in load_model(TRAINING).model.named_parameters()}
    assert not leaves(zero.master) & OLD and leaves(zero.master) >= {"w_in_EDI", "w_in_DI", "probes_EJD"}
    for name, t in zero.master.items():
        torch.testing.assert_close(t, module[name].float(), rtol=0, atol=0)
        assert zero.moments["exp_avg"][name].shape == t.shape


def test_reshard_writes_todays_names(tmp_path):
    out = str(tmp_path / "ep1")
    reshard(TRAINING, out, ep_size=1, progress=False)
    tag_dir = os.path.join(out, tag_for_step(2))
    main = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    experts = torch.load(experts_file(tag_dir, 0), weights_only=False)["experts"]
    for names in (main["module"], *main["param_shapes"], experts):
        assert not leaves(names) & OLD
    torch.testing.assert_close(logits_of(load_model(out).model), recorded_logits(TRAINING), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [TRAINING, CONSOLIDATED], ids=["training", "consolidated"])
def test_export_hf_writes_todays_names_and_the_same_function(tmp_path, path):
    transformers = pytest.importorskip("transformers")
    from moe_dist.checkpoint import export_hf

    out = str(tmp_path / "hf")
    assert export_hf(path, out, progress=False).architecture == "custom"  # research routers
    assert not leaves(load_file(os.path.join(out, "model.safetensors"))) & OLD
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = hf(tokens()).logits
    torch.testing.assert_close(logits, recorded_logits(path), rtol=1e-5, atol=1e-5)


def _resume(rank: int, world: int, ckpt_dir: str, out: str) -> None:
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.trainer import pretrain

    config = copy.deepcopy(TrainingCheckpoint.open(ckpt_dir).config)
    config["train"].update(checkpoint_dir=ckpt_dir,
                           deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"))
    result = pretrain(parse_run_config(config), resume=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result.losses, f)


@pytest.mark.slow
def test_it_resumes_to_the_loss_of_an_uninterrupted_run(tmp_path):
    """2 gloo ranks resume the step-2 checkpoint (weights, expert files, ZeRO-1 Adam state, LR
    schedule, RNG) and train step 3: its loss is the one the pre-rename tree logged for step 3
    of an uninterrupted run; the checkpoint of step 3 is written with today's names."""
    ckpt_dir = str(tmp_path / "ckpt")
    shutil.copytree(TRAINING, ckpt_dir)
    out = str(tmp_path / "losses.json")
    run_deepspeed_ranks(_resume, 2, ckpt_dir, out)
    with open(out) as f:
        losses = {int(k): v for k, v in json.load(f).items()}
    full = {int(k): v for k, v in expected()["full_losses"].items()}
    assert sorted(losses) == [3]
    assert losses[3] == pytest.approx(full[3], rel=1e-6), f"step 3 after resume: {losses[3]} != {full[3]}"
    ckpt = TrainingCheckpoint.open(ckpt_dir)  # now at step 3
    raw = torch.load(os.path.join(ckpt.tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    assert ckpt.step == 3 and not leaves(raw["module"]) & OLD and leaves(raw["module"]) & NEW
