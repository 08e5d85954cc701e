"""import-hf / export-hf against transformers' own classes, built locally from their config classes
(tests/harness/hf.py: GQA, E=4, top-2, each architecture's QK-norm / shared expert / router
settings): the imported model's logits equal transformers' (dropless, one process), export-hf
of it loads with the native class and gives the same logits and the very tensors it was
imported from; dense Llama/Qwen2/Qwen3 import for upcycling; sharded, fused-expert and tied
inputs; every bad input is an error naming the file and field, and leaves nothing behind.
(EP=2 training from an import through the deepspeed launcher: tests/e2e/test_import_hf_train.py.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from tests.harness.hf import MODELS, MOE_MODELS, build_hf, hf_logits, save_hf, tokens

from moe_dist.checkpoint import CheckpointError, export_hf, import_hf, load_consolidated, read_hf_model
from moe_dist.checkpoint.cli import main as cli_main
from moe_dist.checkpoint.hf.importer import RUN_CONFIG_FILE
from moe_dist.model.transformer import MoETransformer

transformers = pytest.importorskip("transformers")
TOL = dict(rtol=1e-4, atol=1e-4)


def moe_dist_logits(cfg, state) -> torch.Tensor:
    model = MoETransformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(tokens()).logits_BSV


def safetensors_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None and key.startswith("-"):
            config.pop(key[1:], None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


def nothing_written(parent) -> bool:
    """No OUT and no staged temporary sibling of it (`.out.tmp-...`)."""
    return not any(n == "out" or n.startswith(".out") for n in os.listdir(parent))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_matches_transformers_logits(tmp_path, name):
    hf = build_hf(name)
    cfg, state = read_hf_model(save_hf(hf, str(tmp_path / "hf")))
    assert (cfg.moe is not None) == (name in MOE_MODELS)
    torch.testing.assert_close(moe_dist_logits(cfg, state), hf_logits(hf), **TOL)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_import_then_export_is_native_and_lossless(tmp_path, name):
    hf = build_hf(name)
    src = save_hf(hf, str(tmp_path / "hf"))
    cons, back = str(tmp_path / "cons"), str(tmp_path / "back")
    import_hf(src, cons, progress=False)
    result = export_hf(cons, back, progress=False)
    assert result.architecture == name and not result.blockers
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert type(loaded).__name__ == MODELS[name][2]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not os.path.exists(os.path.join(back, "modeling_moe_dist.py"))
    torch.testing.assert_close(hf_logits(loaded.eval()), hf_logits(hf), **TOL)
    # The very tensors it came from, under the same names (Hub layout both ways).
    original, exported = safetensors_state(src), safetensors_state(back)
    assert sorted(exported) == sorted(original)
    for key, t in original.items():
        assert torch.equal(exported[key], t), key


def test_import_writes_a_loadable_checkpoint_and_a_run_config(tmp_path, capsys):
    from moe_dist.train.config import parse_run_config

    hf = build_hf("qwen2_moe")
    src, out = save_hf(hf, str(tmp_path / "hf")), str(tmp_path / "cons")
    assert cli_main(["import-hf", src, out, "--quiet"]) == 0
    assert cli_main(["inspect", out]) == 0
    assert f"imported from: {os.path.abspath(src)} (Qwen2MoeForCausalLM)" in capsys.readouterr().out
    with open(os.path.join(out, RUN_CONFIG_FILE)) as f:
        run = yaml.safe_load(f)
    assert run["train"]["init_from"] == os.path.abspath(out)
    assert run["data"]["tokenizer"] == {"kind": "hf", "path": os.path.abspath(src)}
    assert run["moe"]["dropless"] is True and run["moe"]["shared_gate"] is True
    # Ready but for the corpus: with the synthetic one swapped in, it parses as it is.
    run["data"] = {"kind": "synthetic", "tokenizer": {"kind": "byte"}}
    cfg = parse_run_config(run)
    model = MoETransformer(cfg.model).eval()
    load_consolidated(model, cfg.train.init_from)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits_BSV, hf_logits(hf), **TOL)


def test_sharded_input_with_index(tmp_path):
    hf = build_hf("mixtral")
    src = save_hf(hf, str(tmp_path / "hf"), max_shard_size="40KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) > 2
    cfg, state = read_hf_model(src)
    torch.testing.assert_close(moe_dist_logits(cfg, state), hf_logits(hf), **TOL)


def test_fused_expert_layout_of_transformers_5(tmp_path):
    hf = build_hf("qwen3_moe")
    src = save_hf(hf, str(tmp_path / "hf"), save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in safetensors_state(src))
    cfg, state = read_hf_model(src)
    torch.testing.assert_close(moe_dist_logits(cfg, state), hf_logits(hf), **TOL)


def test_tied_lm_head_copy_is_accepted_only_when_equal(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build_hf("qwen2_moe")  # tie_word_embeddings: true
    src = save_hf(hf, str(tmp_path / "hf"))
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, path)
    read_hf_model(src)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}, path)
    with pytest.raises(CheckpointError, match="tie_word_embeddings.*lm_head.weight.*differs"):
        read_hf_model(src)


# ---- bad input -----------------------------------------------------------------------------------

UNSUPPORTED = {
    "sliding-window": ("mixtral", {"sliding_window": 8}, r"sliding_window is 8"),
    "use-sliding-window": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, r"use_sliding_window"),
    "rope-scaling": ("qwen2_moe", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                     r"rope_parameters.rope_type is 'linear'"),
    "rope-scaling-v4": ("mixtral", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling is"),
    "activation": ("olmoe", {"hidden_act": "gelu"}, r"hidden_act is 'gelu'"),
    "clip-qkv": ("olmoe", {"clip_qkv": 8.0}, r"clip_qkv is 8.0"),
    "attention-bias": ("qwen3_moe", {"attention_bias": True}, r"attention_bias is True"),
    "layer-pattern": ("qwen2_moe", {"decoder_sparse_step": 1, "mlp_only_layers": [1]}, r"MoE layers \[0, 2, 3\]"),
    "missing-field": ("mixtral", {"-num_local_experts": None}, r"num_local_experts is missing"),
    "model-type": ("mixtral", {"model_type": "deepseek_v3"}, r"model_type 'deepseek_v3'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_field_is_an_error_naming_it(tmp_path, case, capsys):
    name, changes, message = UNSUPPORTED[case]
    assert_import_refused(save_hf(build_hf(name), str(tmp_path / "hf")), changes, message, tmp_path, capsys)


def assert_import_refused(src: str, changes: dict, message: str, tmp_path, capsys) -> None:
    """`src`'s config edited by `changes` is refused by import-hf (API and CLI, exit 2) with an
    error matching `message` that names the config file, and nothing is written."""
    edit_config(src, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert os.path.join(src, "config.json") in str(err.value)
    assert nothing_written(tmp_path)
    assert cli_main(["import-hf", src, str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: " in capsys.readouterr().err and nothing_written(tmp_path)


def test_missing_shard_is_an_error_naming_it(tmp_path):
    src = save_hf(build_hf("olmoe"), str(tmp_path / "hf"), max_shard_size="40KB")
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    os.remove(os.path.join(src, shard))
    with pytest.raises(CheckpointError, match=rf"missing shard\(s\) \['{shard}'\].*model.safetensors.index.json"):
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("field, value, tensor", [
    ("num_key_value_heads", 4, "self_attn.k_proj.weight"),
    ("moe_intermediate_size", 8, "experts.0.gate_proj.weight"),
    ("vocab_size", 299, "model.embed_tokens.weight"),
])
def test_shape_disagreeing_with_config_names_file_tensor_and_field(tmp_path, field, value, tensor):
    src = save_hf(build_hf("qwen2_moe"), str(tmp_path / "hf"))
    edit_config(src, **{field: value})
    with pytest.raises(CheckpointError, match=rf"model.safetensors': tensor \S*{tensor} has shape .*config.json' "
                                              rf"\([^)]*{field} {value}"):
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert nothing_written(tmp_path)


def test_missing_or_extra_tensors_and_pickles_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_hf(build_hf("mixtral"), str(tmp_path / "hf"))
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    save_file({k: v for k, v in state.items() if "experts.3.w2" not in k}, path)
    with pytest.raises(CheckpointError, match=r"lacks 3 tensor\(s\).*experts.3.w2.weight"):
        read_hf_model(src)
    save_file({**state, "model.layers.0.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"model.layers.0.extra.weight.*does not drop weights"):
        read_hf_model(src)
    os.rename(path, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin \(a pickle"):
        read_hf_model(src)
    with pytest.raises(CheckpointError, match=r"does not exist .*nothing is downloaded"):
        read_hf_model("mistralai/Mixtral-8x7B-v0.1")


# ---- export choices ------------------------------------------------------------------------------

def test_export_refuses_a_named_architecture_that_cannot_express_the_model(tmp_path):
    src = save_hf(build_hf("mixtral"), str(tmp_path / "hf"))
    import_hf(src, str(tmp_path / "cons"), progress=False)
    with pytest.raises(CheckpointError, match=r"OLMoE cannot express .*model.qk_norm is 'none'; OLMoE's is 'full'"):
        export_hf(str(tmp_path / "cons"), str(tmp_path / "out"), architecture="olmoe", progress=False)
    assert nothing_written(tmp_path)


def test_export_without_the_shared_gate_falls_back_to_custom_with_reasons(tmp_path):
    from moe_dist.checkpoint import save_consolidated
    from moe_dist.model.config import parse_model_config

    cfg = parse_model_config(dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=24),
                             dict(num_experts=4, d_ff=16, num_shared_experts=1, dropless=True))
    save_consolidated(MoETransformer(cfg), str(tmp_path / "cons"))
    result = export_hf(str(tmp_path / "cons"), str(tmp_path / "out"), progress=False)
    assert result.architecture == "custom"
    assert "the shared expert has no sigmoid gate (moe.shared_gate false); Qwen2-MoE's has one" in \
        result.blockers["qwen2_moe"]


def test_the_hf_tokenizer_travels_from_import_to_export(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "</s>", "<s>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                bos_token="<s>")
    src = save_hf(build_hf("olmoe", bos_token_id=2, eos_token_id=1, pad_token_id=None), str(tmp_path / "hf"))
    fast.save_pretrained(src)
    import_hf(src, str(tmp_path / "cons"), dtype="bf16", progress=False)
    with open(os.path.join(tmp_path / "cons", RUN_CONFIG_FILE)) as f:
        assert yaml.safe_load(f)["train"]["deepspeed_config"] == "configs/deepspeed/zero2_bf16.json"
    result = export_hf(str(tmp_path / "cons"), str(tmp_path / "back"), progress=False)
    assert result.architecture == "olmoe" and result.tokenizer
    with open(tmp_path / "back" / "config.json") as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (2, 1, "bfloat16")
    text = "w3 w17 w5 nope w39"
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))(text)["input_ids"] == \
        fast(text)["input_ids"] == [6, 20, 8, 0, 42]
