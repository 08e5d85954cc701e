"""import-hf / export-hf of the DeepSeek-V3 family against transformers' own classes, built locally
from their config classes (tests/harness/hf_deepseek.py: DeepSeek-V2 with a full-rank query and a
softmax router, DeepSeek-V3 with a low-rank query and a biased sigmoid router, GLM-4.5 with
partial rotary, q/k/v biases and q/k norm; each with a dense first layer of its own width, shared
experts and group-limited routing): the imported model's logits equal transformers' (also with
YaRN, with V3's non-interleaved rotary and without a group limit), the native export loads back in
the same class with the same logits and the very tensors it came from, greedy generation through
moe_dist's latent KV cache equals transformers' `generate` on a left-padded batch, and every field
moe_dist does not compute (other rope types, a group layout transformers cannot run, ...) is an
error naming it, with nothing written."""

from __future__ import annotations

import os

import pytest
import torch
from tests.harness.hf import save_hf, tokens
from tests.harness.hf_deepseek import MODELS, YARN, build_hf
from tests.unit.checkpoint.test_import_hf import edit_config, nothing_written, safetensors_state

from moe_dist.checkpoint import CheckpointError, export_hf, import_hf, read_hf_model
from moe_dist.checkpoint.cli import main as cli_main
from moe_dist.model.generation import SamplingConfig, generate
from moe_dist.model.transformer import MoETransformer

transformers = pytest.importorskip("transformers")
TOL = dict(rtol=1e-4, atol=1e-4)
VARIANTS = {**{name: (name, {}) for name in MODELS},
            "deepseek_v3-yarn": ("deepseek_v3", {"rope_parameters": YARN}),
            "deepseek_v3-half_split_rope": ("deepseek_v3", {"rope_interleave": False}),
            "deepseek_v2-yarn": ("deepseek_v2", {"rope_parameters": YARN}),
            "deepseek_v2-greedy": ("deepseek_v2", {"topk_method": "greedy"}),
            "deepseek_v3-one_group": ("deepseek_v3", {"n_group": 1, "topk_group": 1}),
            "glm4_moe-all_groups": ("glm4_moe", {"n_group": 4, "topk_group": 4}),
            "glm4_moe-whole_rotary": ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                                       "partial_rotary_factor": 1.0}})}


def moe_dist_model(cfg, state) -> MoETransformer:
    model = MoETransformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def logits(model, toks=None) -> torch.Tensor:
    with torch.no_grad():
        toks = tokens() if toks is None else toks
        return model(toks).logits_BSV if isinstance(model, MoETransformer) else model(toks).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers_logits(tmp_path, variant):
    name, overrides = VARIANTS[variant]
    hf = build_hf(name, **overrides)
    cfg, state = read_hf_model(save_hf(hf, str(tmp_path / "hf")))
    assert cfg.moe_layer_indices == [1, 2] and cfg.d_ff == 40 and cfg.moe.d_ff == 16
    assert cfg.attention == ("mha" if name == "glm4_moe" else "mla")
    model = moe_dist_model(cfg, state)
    torch.testing.assert_close(logits(model), logits(hf), **TOL)
    router = cfg.moe.router
    limited = hf.config.topk_group < hf.config.n_group and getattr(hf.config, "topk_method", None) != "greedy"
    assert (router.expert_groups, router.topk_groups) == ((hf.config.n_group, hf.config.topk_group) if limited
                                                          else (1, 1))
    if limited:  # the group limit is read, and it matters
        assert router.group_score == ("max" if name == "deepseek_v2" else "top2_sum")
        router.topk_groups = router.expert_groups
        assert not torch.allclose(logits(model), logits(hf), **TOL)
        router.topk_groups = hf.config.topk_group
    if MODELS[name][0] != "DeepseekV2Config":  # the correction bias is read, and it matters
        bias = model.blocks[1].moe.router.selection_bias_E
        assert bias.abs().min() > 0
        bias.zero_()
        assert not torch.allclose(logits(model), logits(hf), **TOL)


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v2-greedy", "deepseek_v3", "deepseek_v3-yarn",
                                     "glm4_moe"])
def test_import_then_native_export_loads_back_with_equal_logits_and_tensors(tmp_path, variant):
    name, overrides = VARIANTS[variant]
    hf = build_hf(name, **overrides)
    src = save_hf(hf, str(tmp_path / "hf"))
    cons, back = str(tmp_path / "cons"), str(tmp_path / "back")
    import_hf(src, cons, progress=False)
    result = export_hf(cons, back, progress=False)
    assert result.architecture == name and not result.blockers
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert type(loaded).__name__ == MODELS[name][2]
    c = hf.config
    greedy = getattr(c, "topk_method", None) == "greedy"
    assert (loaded.config.n_group, loaded.config.topk_group) == ((1, 1) if greedy else (c.n_group, c.topk_group))
    if name == "deepseek_v2":
        assert loaded.config.topk_method == c.topk_method
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(logits(loaded.eval()), logits(hf), **TOL)
    original, exported = safetensors_state(src), safetensors_state(back)
    assert sorted(exported) == sorted(original)
    for key, t in original.items():  # the rotary rows permuted there and back
        assert torch.equal(exported[key], t), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_generation_with_the_latent_cache_equals_transformers_generate(tmp_path, name):
    hf = build_hf(name)
    cfg, state = read_hf_model(save_hf(hf, str(tmp_path / "hf")))
    model = moe_dist_model(cfg, state)
    prompts, new = [[5, 9, 200, 3, 3, 17, 40], [256, 1], [7, 7, 7, 7]], 12
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=new))
    assert ours == generate(model, prompts, SamplingConfig(max_new_tokens=new), use_cache=False)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        got = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    assert ours == got[:, L:].tolist()
    assert len(set(map(tuple, ours))) > 1  # the prompts lead somewhere different


# ---- bad input -----------------------------------------------------------------------------------

UNSUPPORTED = {
    "n-group-divides": ("deepseek_v3", {"n_group": 3, "topk_group": 1},
                        r"n_group is 3: expected an integer >= 1 dividing n_routed_experts \(8\)"),
    "topk-group": ("glm4_moe", {"n_group": 1, "topk_group": 0}, r"topk_group is 0"),
    "topk-group-above-n-group": ("deepseek_v3", {"n_group": 2, "topk_group": 3},
                                 r"topk_group is 3: expected an integer in \[1, n_group \(2\)\]"),
    "top2-of-one": ("glm4_moe", {"n_group": 8, "topk_group": 4}, r"n_group is 8: GLM-4.5 ranks a group by the sum"),
    "too-few-allowed": ("deepseek_v2", {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
                        r"topk_group is 1: the topk_group best groups hold"),
    "v2-no-n-group": ("deepseek_v2", {"-n_group": None}, r"n_group is None"),
    "v3-topk-method": ("deepseek_v3", {"topk_method": "greedy"}, r"topk_method is 'greedy': DeepSeek-V3 routes"),
    "v2-topk-method": ("deepseek_v2", {"topk_method": "noaux_tc"}, r"topk_method is 'noaux_tc'"),
    "v2-norm-topk-prob": ("deepseek_v2", {"norm_topk_prob": True}, r"norm_topk_prob is True"),
    "rope-type": ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                  r"rope_parameters.rope_type is 'linear'"),
    "rope-scaling-v4": ("deepseek_v2", {"-rope_parameters": None, "rope_theta": 1e4,
                                        "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                        r"rope_parameters.rope_type is 'dynamic'"),
    "mla-attention-bias": ("deepseek_v3", {"attention_bias": True}, r"attention_bias is True"),
    "mla-kv-heads": ("deepseek_v3", {"num_key_value_heads": 2}, r"num_key_value_heads is 2"),
    "no-moe-layer": ("glm4_moe", {"first_k_dense_replace": 3}, r"first_k_dense_replace is 3"),
    "activation": ("deepseek_v3", {"hidden_act": "gelu"}, r"hidden_act is 'gelu'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_field_is_an_error_naming_it(tmp_path, case, capsys):
    name, changes, message = UNSUPPORTED[case]
    src = save_hf(build_hf(name), str(tmp_path / "hf"))
    edit_config(src, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert os.path.join(src, "config.json") in str(err.value)
    assert nothing_written(tmp_path)
    assert cli_main(["import-hf", src, str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: " in capsys.readouterr().err and nothing_written(tmp_path)


def test_multi_token_prediction_weights_are_refused_by_name(tmp_path, capsys):
    from safetensors.torch import save_file

    src = save_hf(build_hf("deepseek_v3"), str(tmp_path / "hf"))
    state = safetensors_state(src)
    # DeepSeek-V3's MTP module is stored as the layer after the last (model.layers.61 of 61).
    state.update({k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in state.items()
                  if k.startswith("model.layers.2.")})
    state["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"multi-token prediction weights \(num_nextn_predict_layers: 1 "
                                              r"layer\(s\) past num_hidden_layers 3"):
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert nothing_written(tmp_path)


def test_a_model_neither_native_class_nor_the_remote_code_computes_is_refused(tmp_path):
    src = save_hf(build_hf("deepseek_v3"), str(tmp_path / "hf"))
    cons = import_hf(src, str(tmp_path / "cons"), progress=False)
    with pytest.raises(CheckpointError, match=r"remote code cannot express .*model.attention is 'mla'"):
        export_hf(cons, str(tmp_path / "out"), architecture="custom", progress=False)
    with pytest.raises(CheckpointError, match=r"DeepSeek-V2 cannot express .*router.score is 'sigmoid'"):
        export_hf(cons, str(tmp_path / "out"), architecture="deepseek_v2", progress=False)
    assert nothing_written(tmp_path)


def test_a_group_ranking_the_architecture_lacks_is_an_export_blocker(tmp_path):
    from moe_dist.checkpoint.hf.arch import ARCHS, export_blockers

    cfg, _ = read_hf_model(save_hf(build_hf("deepseek_v3"), str(tmp_path / "hf")))
    assert export_blockers(ARCHS["deepseek_v3"], cfg, True) == []
    cfg.moe.router.group_score = "max"
    assert export_blockers(ARCHS["deepseek_v3"], cfg, True) == [
        "router.group_score is 'max'; DeepSeek-V3 ranks expert groups by 'top2_sum'"]
    cfg.moe.router.topk_groups = cfg.moe.router.expert_groups  # no limit: the ranking is never used
    assert export_blockers(ARCHS["deepseek_v3"], cfg, True) == []
