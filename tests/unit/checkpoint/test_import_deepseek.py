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
from tests.harness.hf_deepseek import MODELS, YARN, build_hf, write_mtp_layer
from tests.unit.checkpoint.test_import_hf import (assert_import_refused, edit_config, nothing_written,
                                                  safetensors_state)

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
    assert_import_refused(save_hf(build_hf(name), str(tmp_path / "hf")), changes, message, tmp_path, capsys)


# ---- multi-token prediction -------------------------------------------------------------------

def reference_mtp_loss(hf, mtp: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP loss built from transformers' own modules: a DeepseekV3DecoderLayer holding
    the written weights on eh_proj([enorm(embed(t+1)); hnorm(h_t)]), where h_t is transformers'
    final (normed) hidden state of `inputs`, then shared_head.norm and the head, against token t+2
    (`targets` are `inputs` shifted by one)."""
    import copy

    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    p, E = "model.layers.3.", hf.config.n_routed_experts
    layer = copy.deepcopy(hf.model.layers[2])
    sd = {}
    for key in layer.state_dict():
        if key == "mlp.experts.gate_up_proj":
            sd[key] = torch.stack([torch.cat([mtp[f"{p}mlp.experts.{e}.gate_proj.weight"],
                                              mtp[f"{p}mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
        elif key == "mlp.experts.down_proj":
            sd[key] = torch.stack([mtp[f"{p}mlp.experts.{e}.down_proj.weight"] for e in range(E)])
        else:
            sd[key] = mtp[p + key]
    layer.load_state_dict(sd)
    D, eps = hf.config.hidden_size, hf.config.rms_norm_eps
    norms = {}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        norms[name] = DeepseekV3RMSNorm(D, eps)
        norms[name].weight.data.copy_(mtp[f"{p}{name}.weight"])
    with torch.no_grad():
        B, S = inputs.shape
        h = hf.model(inputs).last_hidden_state[:, :-1]
        e = hf.model.embed_tokens(targets[:, :-1])
        x = torch.cat([norms["enorm"](e), norms["hnorm"](h)], dim=-1) @ mtp[p + "eh_proj.weight"].t()
        pos = torch.arange(S - 1).unsqueeze(0)
        mask = torch.full((S - 1, S - 1), float("-inf")).triu(1).expand(B, 1, S - 1, S - 1)
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos))
        x = x[0] if isinstance(x, tuple) else x
        logits = norms["shared_head.norm"](x) @ mtp[p + "shared_head.head.weight"].t()
        return torch.nn.functional.cross_entropy(logits.reshape(B * (S - 1), -1), targets[:, 1:].reshape(-1))


def test_a_deepseek_v3_checkpoint_with_its_mtp_module_imports_it(tmp_path, capsys):
    from moe_dist.checkpoint.hf.arch import ARCHS
    from moe_dist.checkpoint.hf.tensors import tensor_plan

    hf = build_hf("deepseek_v3")
    src = save_hf(hf, str(tmp_path / "hf"))
    mtp = write_mtp_layer(src)
    assert cli_main(["import-hf", src, str(tmp_path / "cons"), "--quiet"]) == 0
    assert "the checkpoint's MTP module imported (model.mtp_layers 1)" in capsys.readouterr().out
    cfg, state = read_hf_model(src)
    assert cfg.mtp_layers == 1
    block = {k: v for k, v in state.items() if k.startswith("blocks.3.")}
    for m in tensor_plan(ARCHS["deepseek_v3"], cfg):  # each MTP tensor is what was written, mapped
        if m.target.startswith("blocks.3."):
            for hf_tensor, t in zip(m.sources, m.to_hf(block.pop(m.target))):
                assert torch.equal(t, mtp.pop(hf_tensor.name)), hf_tensor.name
    assert not block and sorted(mtp) == ["model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"]
    assert torch.equal(state["blocks.3.eh_proj.weight"], write_mtp_layer(src)["model.layers.3.eh_proj.weight"])

    model = moe_dist_model(cfg, state)
    torch.testing.assert_close(logits(model), logits(hf), **TOL)  # the main model is transformers'
    toks = tokens()
    model.train()
    out = model(toks[:, :-1], toks[:, 1:])
    assert torch.isfinite(out.mtp_loss)
    # moe_dist's MTP loss of (inputs, targets) is DeepSeek-V3's on the whole sequence
    torch.testing.assert_close(out.mtp_loss, reference_mtp_loss(hf, write_mtp_layer(src), toks[:, :-1], toks[:, 1:]),
                               **TOL)


def test_mtp_weights_can_be_dropped_and_a_fresh_block_added(tmp_path, capsys):
    hf = build_hf("deepseek_v3")
    plain = save_hf(hf, str(tmp_path / "plain"))
    cfg, state = read_hf_model(plain)
    assert cfg.mtp_layers == 0 and not any(k.startswith("blocks.3.") for k in state)
    with_mtp = save_hf(hf, str(tmp_path / "mtp"))
    write_mtp_layer(with_mtp)
    assert cli_main(["import-hf", with_mtp, str(tmp_path / "dropped"), "--quiet", "--mtp", "drop"]) == 0
    assert "MTP weights left out (--mtp drop)" in capsys.readouterr().out
    dropped_cfg, dropped = read_hf_model(with_mtp, mtp="drop")
    assert dropped_cfg.mtp_layers == 0 and dropped.keys() == state.keys()

    fresh_cfg, fresh = read_hf_model(plain, mtp="fresh")
    assert fresh_cfg.mtp_layers == 1
    model = moe_dist_model(fresh_cfg, fresh)  # strict: every MTP tensor is there
    torch.testing.assert_close(logits(model), logits(hf), **TOL)
    model.train()
    assert torch.isfinite(model(tokens()[:, :-1], tokens()[:, 1:]).mtp_loss)
    with pytest.raises(CheckpointError, match=r"--mtp fresh initialises an MTP block for a checkpoint without one"):
        import_hf(with_mtp, str(tmp_path / "out"), progress=False, mtp="fresh")
    assert nothing_written(tmp_path)


MTP_REFUSED = {
    "copy-differs": ("deepseek_v3", "model.layers.3.embed_tokens.weight", None,
                     r"the MTP layer's model.layers.3.embed_tokens.weight differs from model.embed_tokens.weight"),
    "not-declared": ("deepseek_v3", None, {"num_nextn_predict_layers": 0}, r"num_nextn_predict_layers 0; moe_dist "
                                                                            r"imports one MTP module, layer 3"),
    "glm4": ("glm4_moe", None, None, r"moe_dist maps DeepSeek-V3's MTP module only, not GLM-4.5's: import with "
                                     r"--mtp drop"),
    "v2": ("deepseek_v2", None, None, r"DeepSeek-V2 has no multi-token prediction and moe_dist does not drop"),
}


@pytest.mark.parametrize("case", sorted(MTP_REFUSED))
def test_mtp_weights_moe_dist_cannot_take_are_refused_by_name(tmp_path, case, capsys):
    from safetensors.torch import save_file

    name, perturb, config, message = MTP_REFUSED[case]
    hf = build_hf(name)
    src = save_hf(hf, str(tmp_path / "hf"))
    if name == "glm4_moe":  # its layer 3 written as V3's is: enough to be recognized and refused
        state = safetensors_state(src)
        state.update({k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in state.items()
                      if k.startswith("model.layers.2.")})
        save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    else:
        write_mtp_layer(src)
    if perturb:
        state = safetensors_state(src)
        state[perturb] = state[perturb] + 1.0
        save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    if config:
        edit_config(src, **config)
    with pytest.raises(CheckpointError, match=message):
        import_hf(src, str(tmp_path / "out"), progress=False)
    assert nothing_written(tmp_path)
    assert cli_main(["import-hf", src, str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: " in capsys.readouterr().err and nothing_written(tmp_path)
    if case == "glm4":  # what the message offers works
        cfg, state = read_hf_model(src, mtp="drop")
        assert cfg.mtp_layers == 0
        torch.testing.assert_close(logits(moe_dist_model(cfg, state)), logits(hf), **TOL)


def test_export_drops_the_mtp_block_and_says_so(tmp_path, capsys):
    hf = build_hf("deepseek_v3")
    src = save_hf(hf, str(tmp_path / "hf"))
    write_mtp_layer(src)
    cons, back = import_hf(src, str(tmp_path / "cons"), progress=False), str(tmp_path / "back")
    assert cli_main(["export-hf", cons, back, "--quiet"]) == 0
    assert "multi-token prediction dropped: the MTP block (blocks.3.*) is not exported" in capsys.readouterr().out
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.config.num_nextn_predict_layers == 0
    assert not any(k.startswith("model.layers.3.") for k in safetensors_state(back))
    torch.testing.assert_close(logits(loaded.eval()), logits(hf), **TOL)


def test_loading_a_checkpoint_without_mtp_into_an_mtp_model_is_a_clear_error(tmp_path):
    from dataclasses import replace

    from moe_dist.checkpoint import load_consolidated
    from moe_dist.common.config import ConfigError
    from moe_dist.train.preflight.start import check_init_from

    src = save_hf(build_hf("deepseek_v3"), str(tmp_path / "hf"))
    cons = import_hf(src, str(tmp_path / "cons"), progress=False)
    cfg, _ = read_hf_model(src)
    mtp_cfg = replace(cfg, mtp_layers=1)
    message = r"model.mtp_layers is 0 in the checkpoint but 1 in the model: the checkpoint has no MTP block"
    with pytest.raises(CheckpointError, match=message):
        load_consolidated(MoETransformer(mtp_cfg), cons)
    with pytest.raises(ConfigError, match=r"train.init_from: .*" + message):
        check_init_from(cons, mtp_cfg, 0)
    write_mtp_layer(src)
    with_mtp = import_hf(src, str(tmp_path / "with_mtp"), progress=False)
    with pytest.raises(CheckpointError, match=r"model.mtp_layers is 1 in the checkpoint but 0 in the model: the "
                                              r"model has no place"):
        load_consolidated(MoETransformer(cfg), with_mtp)
    load_consolidated(MoETransformer(mtp_cfg), with_mtp)


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
