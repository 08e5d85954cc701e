"""Checkpoint tools on real training checkpoints (tests/harness/ckpt.py: 2 gloo ranks, trainer API):
consolidate -> identical logits in one process; load_consolidated at any EP size; ZeRO master
weights; reshard 2->1 and 1->2 then resume on the un-resharded run's loss curve; reshard to the
same layout reproduces DeepSpeed's own files; inspect; Mixtral export; the CLI; corrupted and
partial checkpoints, and ZeRO files of an unverified DeepSpeed version, fail naming the file, and
nothing is written to OUT unless all succeeded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.harness.ckpt import N, fixed_tokens, read_losses, training_worker
from tests.harness.train import REPO, run_deepspeed_ranks

from moe_dist.checkpoint import (CheckpointError, ConsolidatedCheckpoint, TrainingCheckpoint, consolidate,
                                 load_consolidated, open_checkpoint, reshard, summarize)
from moe_dist.checkpoint.cli import main as cli_main
from moe_dist.checkpoint.consolidated import single_rank_config
from moe_dist.checkpoint.training.layout import tag_for_step
from moe_dist.checkpoint.training.tags import COMPLETE, MARKER, read_marker, tag_problems, tag_state, write_marker
from moe_dist.checkpoint.training.zero import DEEPSPEED_VERSIONS, read_zero_state
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer

TIGHT = dict(rtol=1e-6, atol=1e-6)  # same weights, same math, different grouping of expert GEMMs
RESUME = dict(rtol=1e-5, atol=1e-6)  # a different EP size sums gradients in another order


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_runs")
    run_deepspeed_ranks(training_worker, 2, str(tmp))
    return tmp


def single_process_model(path: str) -> MoETransformer:
    ckpt = ConsolidatedCheckpoint.open(path)
    model = MoETransformer(ckpt.model_cfg)
    load_consolidated(model, path)
    return model.eval()


def ep1_model(config: dict) -> MoETransformer:
    single = single_rank_config(config)
    return MoETransformer(parse_model_config(single["model"], single["moe"]))


def logits_of(model: MoETransformer) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_tokens()).logits_BSV


@pytest.mark.parametrize("run", ["a", "c"])
def test_consolidated_checkpoint_gives_the_trained_models_logits(runs, tmp_path, run):
    out = str(tmp_path / "consolidated")
    consolidate(str(runs / run), out, progress=False)
    trained = torch.load(runs / f"{run}_logits.pt")
    torch.testing.assert_close(logits_of(single_process_model(out)), trained, **TIGHT)


def test_training_initialized_from_a_consolidated_checkpoint_starts_from_its_weights(runs):
    torch.testing.assert_close(torch.load(runs / "init_from_logits.pt"), torch.load(runs / "a_logits.pt"), **TIGHT)


def test_init_from_that_is_not_a_consolidated_checkpoint_is_refused_before_training(tmp_path):
    from moe_dist.common.config import ConfigError
    from moe_dist.train.preflight.start import check_init_from

    with pytest.raises(ConfigError, match=r"train.init_from '.*nowhere' is not a directory"):
        check_init_from(str(tmp_path / "nowhere"), None, 0)
    with pytest.raises(ConfigError, match=r"train.init_from: .*moe_dist.json"):
        check_init_from(str(tmp_path), None, 0)


def test_load_consolidated_at_any_ep_size(runs):
    trained = torch.load(runs / "a_logits.pt")
    # ep_size 2 on 2 ranks: the trained model's own layout and computation, bit for bit
    assert torch.equal(torch.load(runs / "loaded_ep2_logits.pt"), trained)
    torch.testing.assert_close(torch.load(runs / "loaded_ep1_logits.pt"), trained, **TIGHT)


@pytest.mark.parametrize("run", ["a", "c"])
def test_fp32_master_weights_equal_the_module_weights(runs, run):
    ckpt = TrainingCheckpoint.open(str(runs / run))
    module = ckpt.module_state(progress=False)
    master = read_zero_state(ckpt, progress=False).master
    params = dict(ep1_model(ckpt.config).named_parameters())
    assert sorted(master) == sorted(params)  # every parameter, experts stacked globally
    for name, t in master.items():
        assert t.shape == params[name].shape, name
        assert torch.equal(t, module[name]), name


def test_bf16_master_weights_are_the_fp32_copies(runs, tmp_path):
    out = str(tmp_path / "master")
    consolidate(str(runs / "e"), out, master_weights=True, progress=False)
    master = ConsolidatedCheckpoint.open(out).state_dict()
    module = TrainingCheckpoint.open(str(runs / "e")).module_state(progress=False)
    params = [n for n in master if not n.endswith(("selection_bias_E",))]
    assert all(master[n].dtype == torch.float32 and module[n].dtype == torch.bfloat16 for n in params)
    assert all(torch.equal(master[n].bfloat16(), module[n]) for n in params)
    assert any(not torch.equal(master[n], module[n].float()) for n in params)  # fp32 precision was kept


@pytest.mark.parametrize("original, resumed, ep_sizes", [("a", "b", "2->1"), ("c", "d", "1->2")])
def test_resharded_checkpoint_resumes_on_the_same_loss_curve(runs, original, resumed, ep_sizes):
    full, after = read_losses(runs / f"{original}.json"), read_losses(runs / f"{resumed}.json")
    assert sorted(after) == list(range(N + 1, 2 * N + 1))
    torch.testing.assert_close(torch.tensor([after[s] for s in sorted(after)]),
                               torch.tensor([full[s] for s in sorted(after)]), **RESUME,
                               msg=lambda m: f"ep_size {ep_sizes}: {m}")


def _all_files_equal(a: str, b: str) -> None:
    """Every file of two tag directories holds the same objects, tensors bit for bit (the client
    state's provenance entry of a resharded checkpoint aside)."""
    names = sorted(n for n in os.listdir(a) if n != MARKER)  # the trainer's completion marker
    assert names == sorted(n for n in os.listdir(b) if n != MARKER)
    for name in names:
        x = torch.load(os.path.join(a, name), weights_only=False)
        y = torch.load(os.path.join(b, name), weights_only=False)
        for obj in (x, y):
            if isinstance(obj, dict) and "moe_dist" in obj:
                obj["moe_dist"].pop("resharded_from", None)
        _assert_same(x, y, name)


def _assert_same(x, y, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, np.ndarray):  # numpy's RNG state in rank_state files
        assert np.array_equal(x, y), where
    elif isinstance(x, dict):
        assert list(x) == list(y), f"{where}: keys {list(x)} != {list(y)}"
        for k in x:
            _assert_same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f"{where}[{i}]")
    elif type(x).__module__.startswith("deepspeed.runtime") and hasattr(x, "__dict__"):
        assert type(x) is type(y) and vars(x) == vars(y), where  # the loss scaler
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def test_reshard_to_the_same_layout_reproduces_deepspeeds_files(runs, tmp_path):
    out = str(tmp_path / "same")
    reshard(str(runs / "a"), out, ep_size=2, tag=tag_for_step(N), progress=False)
    _all_files_equal(str(runs / "a" / tag_for_step(N)), os.path.join(out, tag_for_step(N)))


def test_reshard_through_four_ranks_and_back_is_lossless(runs, tmp_path):
    wide, back = str(tmp_path / "ep4"), str(tmp_path / "back")
    reshard(str(runs / "a"), wide, ep_size=4, world_size=4, tag=tag_for_step(N), progress=False)
    ckpt = TrainingCheckpoint.open(wide)
    assert (ckpt.ep_size, ckpt.world_size, len(os.listdir(ckpt.tag_dir))) == (4, 4, 1 + 4 + 4 + 2 + 1)
    assert tag_state(wide, tag_for_step(N)).status == COMPLETE  # its marker, with the source's run id
    assert tag_problems(ckpt.tag_dir) == []
    reshard(wide, back, ep_size=2, world_size=2, progress=False)
    _all_files_equal(str(runs / "a" / tag_for_step(N)), os.path.join(back, tag_for_step(N)))


def test_inspect_reports_layout_routers_and_parameter_counts(runs):
    s = summarize(open_checkpoint(str(runs / "a")))
    model = ep1_model(s["config"])
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert (s["step"], s["ep_size"], s["world_size"], s["zero_stage"], s["bf16"]) == (2 * N, 2, 2, 1, False)
    assert (s["layers"], s["moe_layers"], s["experts_per_layer"], s["top_k"]) == (2, [0, 1], {0: 4, 1: 4}, 2)
    assert s["router_types"] == {0: "topk", 1: "topk"} and s["dtypes"] == ["float32"]
    assert (s["parameters_total"], s["parameters_experts"]) == (total, expert)
    assert s["parameters_active_per_token"] == total - expert + expert * 2 // 4
    consolidated = summarize(open_checkpoint(str(runs / "a_consolidated")))
    assert consolidated["parameters_total"] == total and consolidated["source"]["ep_size"] == 2


def test_export_hf_mixtral_loads_without_custom_code_and_matches(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "mixtral_a")
    assert cli_main(["export-hf", str(runs / "a"), out, "--quiet"]) == 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not os.path.exists(os.path.join(out, "modeling_moe_dist.py"))
    with torch.no_grad():
        logits = model(fixed_tokens()).logits
    torch.testing.assert_close(logits, torch.load(runs / "a_logits.pt"), **TIGHT)


def test_cli_subcommands(runs, tmp_path, capsys):
    assert cli_main(["inspect", str(runs / "a"), "--tag", tag_for_step(N)]) == 0
    assert f"step: {N}" in capsys.readouterr().out
    out = str(tmp_path / "cons")
    assert cli_main(["consolidate", str(runs / "c"), out, "--dtype", "bf16", "--format", "torch", "--quiet"]) == 0
    state = torch.load(os.path.join(out, "model.pt"))
    assert state["embed.weight"].dtype == torch.bfloat16
    resharded = str(tmp_path / "ep4")
    assert cli_main(["reshard", str(runs / "c"), resharded, "--ep-size", "4", "--world-size", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ep_size 4, world size 4" in printed and "keep the global batch at 4 sequences" in printed
    assert cli_main(["reshard", str(runs / "c"), str(tmp_path / "bad"), "--ep-size", "3", "--world-size", "3",
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "num_experts (4) must be divisible by ep_size (3)" in err and not os.path.exists(tmp_path / "bad")


def test_entry_point_help():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools/convert_checkpoint.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for command in ("inspect", "consolidate", "reshard", "export-hf"):
        assert command in proc.stdout


# ---- corrupted and partial checkpoints ---------------------------------------------------------

def _copy(runs, tmp_path, run: str = "a") -> str:
    dst = str(tmp_path / f"copy_{run}")
    shutil.copytree(runs / run, dst)
    return dst


def _tag_dir(ckpt: str) -> str:
    return os.path.join(ckpt, tag_for_step(2 * N))


def _recommit(ckpt: str) -> None:
    """The tag's completion marker rewritten for its files as they are now, so the reader's own
    checks are reached behind the marker's (sizes, digests): a tag edited with its marker."""
    marker = read_marker(_tag_dir(ckpt))
    write_marker(_tag_dir(ckpt), marker["run_id"], marker["step"])


def _nothing_written(parent, keep: set[str]) -> None:
    """OUT absent and no staging directory left behind."""
    assert set(os.listdir(parent)) == keep


CONVERSIONS = {
    "consolidate": lambda src, out: consolidate(src, out, progress=False),
    "consolidate --master-weights": lambda src, out: consolidate(src, out, master_weights=True, progress=False),
    "reshard": lambda src, out: reshard(src, out, ep_size=1, progress=False),
}


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_missing_expert_file_is_named_and_nothing_is_written(runs, tmp_path, conversion):
    src = _copy(runs, tmp_path)
    os.remove(os.path.join(_tag_dir(src), "moe_experts_ep001.pt"))
    _recommit(src)
    with pytest.raises(CheckpointError, match=r"missing expert \(EP rank 1 of 2\) file .*moe_experts_ep001\.pt"):
        CONVERSIONS[conversion](src, str(tmp_path / "out"))
    _nothing_written(tmp_path, {"copy_a"})


@pytest.mark.parametrize("name, conversion", [
    ("moe_experts_ep000.pt", "consolidate"),
    ("mp_rank_00_model_states.pt", "consolidate"),
    ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "consolidate --master-weights"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "reshard"),
])
def test_truncated_file_is_named_and_nothing_is_written(runs, tmp_path, name, conversion):
    src = _copy(runs, tmp_path)
    path = os.path.join(_tag_dir(src), name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=rf"{name}.*truncated"):
        CONVERSIONS[conversion](src, str(tmp_path / "out"))
    _nothing_written(tmp_path, {"copy_a"})


def test_truncated_consolidated_weights_are_named(runs, tmp_path):
    out = str(tmp_path / "cons")
    consolidate(str(runs / "a"), out, progress=False)
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    model = MoETransformer(ConsolidatedCheckpoint.open(out).model_cfg)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_consolidated(model, out)


def test_config_that_contradicts_the_expert_files_is_named(runs, tmp_path):
    src = _copy(runs, tmp_path)
    main = os.path.join(_tag_dir(src), "mp_rank_00_model_states.pt")
    states = torch.load(main, weights_only=False)
    states["moe_dist"]["config"]["moe"]["ep_size"] = 1
    torch.save(states, main)
    _recommit(src)
    with pytest.raises(CheckpointError, match=r"moe_experts_ep000\.pt' holds ep_size 2 / ep_rank 0; .* expects "
                                              r"ep_size 1 / ep_rank 0"):
        consolidate(src, str(tmp_path / "out"), progress=False)
    _nothing_written(tmp_path, {"copy_a"})


@pytest.mark.parametrize("conversion", ["consolidate --master-weights", "reshard"])
def test_checkpoint_of_an_unverified_deepspeed_version_is_refused(runs, tmp_path, conversion):
    src = _copy(runs, tmp_path)
    main = os.path.join(_tag_dir(src), "mp_rank_00_model_states.pt")
    states = torch.load(main, weights_only=False)
    assert states["ds_version"] in DEEPSPEED_VERSIONS  # what the installed DeepSpeed recorded
    states["ds_version"] = "0.19.6"
    torch.save(states, main)
    _recommit(src)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt' was written by DeepSpeed '0\.19\.6' "
                                              r"\(its ds_version\); .* for DeepSpeed 0\.19\.7, 0\.19\.8 only"):
        CONVERSIONS[conversion](src, str(tmp_path / "out"))
    _nothing_written(tmp_path, {"copy_a"})
    # the module weights are moe_dist's expert files and DeepSpeed's `module`: no ZeRO layout involved
    consolidate(src, str(tmp_path / "module_weights"), progress=False)


def test_model_that_differs_from_the_consolidated_config_is_refused(runs):
    single = single_rank_config(ConsolidatedCheckpoint.open(str(runs / "a_consolidated")).config)
    other = MoETransformer(parse_model_config(single["model"], {**single["moe"], "num_experts": 8}))
    with pytest.raises(CheckpointError, match=r"moe\.num_experts is 4 in the checkpoint but 8 in the model"):
        load_consolidated(other, str(runs / "a_consolidated"))


def test_existing_output_needs_overwrite_and_survives_a_failed_conversion(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists; choose a new path or pass --overwrite"):
        consolidate(str(runs / "a"), str(out), progress=False)
    src = _copy(runs, tmp_path)
    os.remove(os.path.join(_tag_dir(src), "moe_experts_ep000.pt"))
    with pytest.raises(CheckpointError, match="moe_experts_ep000"):
        consolidate(src, str(out), overwrite=True, progress=False)
    assert os.listdir(out) == ["old.txt"]
    _nothing_written(tmp_path, {"copy_a", "out"})
    consolidate(str(runs / "a"), str(out), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["model.safetensors", "moe_dist.json"]
    _nothing_written(tmp_path, {"copy_a", "out"})
