"""`import-hf`: a local Hugging Face directory of MixtralForCausalLM, Qwen2MoeForCausalLM,
Qwen3MoeForCausalLM or OlmoeForCausalLM (or the dense LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, for upcycling) -> a consolidated moe_dist checkpoint (what `train.init_from`
and `load_consolidated` read) and a run config for continued pretraining.

`read_hf_model(hf_dir)` is the reader behind it (also `upcycle`'s source of dense weights):
config.json -> ModelConfig (arch.py: unsupported fields are errors naming them), then every
name and shape the config implies checked against the safetensors headers (a missing, extra or
mis-shaped tensor is an error naming the file and the config fields), then the tensors read one
moe_dist tensor at a time (tensors.py). The imported model is dropless, as the HF models
are, so its logits equal transformers' (tests/unit/checkpoint/test_import_hf.py, tests/e2e/test_import_hf_train.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml
from torch import Tensor

from moe_dist.checkpoint.consolidated import FORMAT, FORMAT_VERSION, META_FILE, WEIGHT_FILES
from moe_dist.checkpoint.files import (SAFETENSORS, CheckpointError, check_output, staged_directory, torch_dtype,
                                       write_json, write_weights)
from moe_dist.checkpoint.hf.arch import Arch, moe_dist_sections
from moe_dist.checkpoint.hf.files import CONFIG_FILE, HFWeights, read_hf_config
from moe_dist.checkpoint.hf.tensors import FUSED, HUB, IGNORED_SUFFIXES, Mapping, expert_names, tensor_plan
from moe_dist.common.config import ConfigError, to_dict
from moe_dist.model.config import ModelConfig, parse_model_config

RUN_CONFIG_FILE = "run_config.yaml"


def hf_model_config(hf_dir: str) -> tuple[Arch, ModelConfig, dict[str, Any]]:
    """The architecture, moe_dist ModelConfig and the `model:` / `moe:` sections it was parsed
    from (only what differs from moe_dist's defaults) of `hf_dir`'s config.json; no tensor read."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    arch, model, moe = moe_dist_sections(read_hf_config(hf_dir), path)
    try:
        return arch, parse_model_config(model, moe), {"model": model, "moe": moe}
    except ConfigError as e:
        raise CheckpointError(f"{path}: the {arch.hf_class} config is not a valid moe_dist model: {e}") from None


def _layout(arch: Arch, cfg: ModelConfig, weights: HFWeights) -> str:
    """The experts' on-disk layout ("hub" or "fused"), from the first MoE layer."""
    if not cfg.moe_layer_indices:
        return HUB
    layer = cfg.moe_layer_indices[0]
    for layout in (HUB, FUSED):
        if all(name in weights for name in expert_names(arch, layer, layout)):
            return layout
    raise CheckpointError(f"{weights.hf_dir!r}: layer {layer}'s experts are in neither layout moe_dist reads: "
                          f"per expert ({expert_names(arch, layer, HUB)[0]}, ...) nor fused "
                          f"({', '.join(expert_names(arch, layer, FUSED))})")


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def _check_tensors(plan: list[Mapping], weights: HFWeights, cfg: ModelConfig, config_path: str) -> None:
    """Every tensor the plan reads exists with the shape config.json implies; nothing else is there."""
    wanted = {s.name: s for m in plan for s in m.sources}
    missing = [n for n in wanted if n not in weights]
    if missing:
        raise CheckpointError(f"{weights.hf_dir!r} lacks {len(missing)} tensor(s) that {config_path!r} implies, "
                              f"e.g. {missing[:3]}")
    for name, src in wanted.items():
        shape = weights.shape(name)
        if shape != src.shape:
            raise CheckpointError(f"{weights.path_of(name)!r}: tensor {name} has shape {shape}, but {config_path!r} "
                                  f"({src.fields}) implies {src.shape}")
    extra = [n for n in weights.names() if n not in wanted and not n.endswith(IGNORED_SUFFIXES)]
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # a tied copy some exporters write; checked equal in read_hf_model
    mtp = [n for n in extra if _layer_of(n) is not None and _layer_of(n) >= cfg.n_layers]
    if mtp:
        raise CheckpointError(f"{weights.hf_dir!r} holds multi-token prediction weights (num_nextn_predict_layers: "
                              f"{len({_layer_of(n) for n in mtp})} layer(s) past num_hidden_layers {cfg.n_layers}, "
                              f"e.g. {sorted(mtp)[:2]}); moe_dist does not import MTP modules yet and does not drop "
                              f"weights")
    if extra:
        raise CheckpointError(f"{weights.hf_dir!r} holds {len(extra)} tensor(s) that {config_path!r} does not "
                              f"account for, e.g. {sorted(extra)[:3]} (in {weights.path_of(extra[0])!r}); moe_dist "
                              f"does not drop weights")


def read_hf_model(hf_dir: str, *, dtype: str | None = None,
                  progress: bool = False) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, ep_size-1 state dict) of the Hugging Face model in `hf_dir`, buffers included,
    so `MoETransformer(cfg).load_state_dict(state)` takes it. `dtype` ("fp32", "bf16") casts the
    floating tensors; default: as stored."""
    _, cfg, _, state = _read(hf_dir, dtype, progress)
    return cfg, state


def _read(hf_dir: str, dtype: str | None, progress: bool) -> tuple[Arch, ModelConfig, dict[str, Any],
                                                                   dict[str, Tensor]]:
    cast = torch_dtype(dtype)
    arch, cfg, sections = hf_model_config(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    state: dict[str, Tensor] = {}
    rope_interleave = read_hf_config(hf_dir).get("rope_interleave", arch.defaults.get("rope_interleave", True))
    with HFWeights(hf_dir) as weights:
        plan = tensor_plan(arch, cfg, _layout(arch, cfg, weights), rope_interleave=bool(rope_interleave))
        _check_tensors(plan, weights, cfg, config_path)
        from tqdm import tqdm

        for m in tqdm(plan, desc=f"import {arch.hf_class}", unit="tensor", disable=not progress):
            t = m.to_moe_dist([weights.tensor(s.name) for s in m.sources]).contiguous()
            state[m.target] = t.to(cast) if cast is not None and t.is_floating_point() else t
        if cfg.tie_embeddings and "lm_head.weight" in weights and not torch.equal(
                weights.tensor("lm_head.weight"), weights.tensor("model.embed_tokens.weight")):
            raise CheckpointError(f"{config_path!r} sets tie_word_embeddings, but lm_head.weight in "
                                  f"{weights.path_of('lm_head.weight')!r} differs from model.embed_tokens.weight")
    return arch, cfg, sections, state


def portable_path(path: str) -> str:
    """`path` as a run config should name it: relative to the current folder when inside it (the
    folder training is launched from, as the shipped configs are), else absolute; so a run folder
    that is copied or moved with its checkpoint keeps working."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def continued_run_config(cfg_sections: dict[str, Any], tokenizer: dict[str, Any], out: str, bf16: bool,
                         source: str, command: str) -> str:
    """The YAML of a continued-pretraining run from the consolidated checkpoint `out`: the model
    sections, `tokenizer` as data.tokenizer, and train defaults that also allow a short trial run
    (`--set train.steps=20`: the warmup is shorter than that)."""
    name = os.path.basename(os.path.normpath(out))
    train = {
        "init_from": portable_path(out),
        "deepspeed_config": "configs/deepspeed/zero2_bf16.json" if bf16 else "configs/deepspeed/zero2.json",
        "steps": 1000, "seq_len": min(cfg_sections["model"]["max_seq_len"], 2048), "micro_batch": 1,
        "grad_accum": 8, "lr": 2.0e-5, "min_lr": 2.0e-6, "warmup_steps": 10, "weight_decay": 0.1,
        "log_interval": 10, "eval_interval": 100, "eval_iters": 10, "checkpoint_interval": 250,
        "checkpoint_dir": f"runs/{name}/checkpoints", "tensorboard_dir": f"runs/{name}/tensorboard",
    }
    doc = {"model": cfg_sections["model"], "moe": cfg_sections["moe"],
           "data": {"kind": "megatron", "tokenizer": tokenizer,
                    "megatron": {"prefixes": [f"data/{name}_text_document"], "split": "98,2"}},
           "train": train}
    if doc["moe"] is None:
        del doc["moe"]
    header = (f"# Continued pretraining of {source}, made by\n"
              f"#     {command}\n"
              f"# model/moe: the checkpoint's (docs/checkpoints.md); train.init_from: its weights. Relative paths\n"
              f"# are relative to the folder that command ran in: launch from there.\n"
              f"# Before training: tokenize the corpus with the model's own tokenizer (data.tokenizer;\n"
              f"# docs/data.md) into data.megatron.prefixes, set moe.ep_size (it must divide the GPUs and\n"
              f"# moe.num_experts) and the batch sizes, then (a short trial: add --set train.steps=20)\n"
              f"#     deepspeed --num_gpus N launch/pretrain.py --config {os.path.join(out, RUN_CONFIG_FILE)}\n")
    return header + yaml.safe_dump(doc, sort_keys=False)


def run_config(cfg_sections: dict[str, Any], hf_dir: str, out: str, bf16: bool) -> str:
    """The YAML of a continued-pretraining run from the imported checkpoint `out`."""
    return continued_run_config(cfg_sections, {"kind": "hf", "path": portable_path(hf_dir)}, out, bf16,
                                source=portable_path(hf_dir),
                                command=f"python tools/convert_checkpoint.py import-hf {hf_dir} {out}")


def import_hf(hf_dir: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
              progress: bool = True) -> str:
    """Write the consolidated checkpoint of `hf_dir` and its run config (OUT/run_config.yaml) to
    the directory `out` (staged: nothing is written unless everything succeeded); returns `out`."""
    check_output(out, overwrite)
    arch, cfg, minimal, state = _read(hf_dir, dtype, progress)
    sections = {"model": to_dict(cfg)}
    sections["moe"] = sections["model"].pop("moe")
    # The HF directory is the tokenizer (export-hf copies its files and special ids back).
    data = {"tokenizer": {"kind": "hf", "path": os.path.abspath(hf_dir)}}
    meta = {"config": {**sections, "data": data}, "step": None, "tokenizer": None, "weights": "module",
            "dtype": dtype or "as saved", "buffers": sorted(m.target for m in tensor_plan(arch, cfg) if not m.sources),
            "source": {"hf_dir": os.path.abspath(hf_dir), "architecture": arch.hf_class}}
    bf16 = state["embed.weight"].dtype == torch.bfloat16
    with staged_directory(out, overwrite) as tmp:
        weights = os.path.join(tmp, WEIGHT_FILES[SAFETENSORS])
        write_weights(weights, state, SAFETENSORS, metadata={"format": FORMAT})
        write_json(os.path.join(tmp, META_FILE), {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "weights_file": os.path.basename(weights), **meta})
        with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
            f.write(run_config(minimal, hf_dir, out, bf16))
    return out

