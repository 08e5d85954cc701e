"""`import-hf`: a local Hugging Face directory of MixtralForCausalLM, Qwen2MoeForCausalLM,
Qwen3MoeForCausalLM or OlmoeForCausalLM (or the dense LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, for upcycling) -> a consolidated moe_dist checkpoint (what `train.init_from`
and `load_consolidated` read) and a run config for continued pretraining.

`read_hf_model(hf_dir)` is the reader behind it (also `upcycle`'s source of dense weights):
config.json -> ModelConfig (arch.py: unsupported fields are errors naming them), then every
name and shape the config implies checked against the safetensors headers (a missing, extra or
mis-shaped tensor is an error naming the file and the config fields), then the tensors read one
moe_dist tensor at a time (tensors.py). DeepSeek-V3's multi-token prediction module (the layer
after the last) is imported, dropped or freshly added as `mtp` says (MTP_CHOICES). The imported
model is dropless, as the HF models are, so its logits equal transformers'
(tests/unit/checkpoint/test_import_hf.py, tests/e2e/test_import_hf_train.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml
from torch import Tensor

from moe_dist.checkpoint.consolidated import FORMAT, FORMAT_VERSION, META_FILE, WEIGHT_FILES
from moe_dist.checkpoint.files import (SAFETENSORS, CheckpointError, check_option, check_output, staged_directory,
                                       torch_dtype, write_json, write_weights)
from moe_dist.checkpoint.hf.arch import Arch, moe_dist_sections
from moe_dist.checkpoint.hf.files import CONFIG_FILE, HFWeights, read_hf_config
from moe_dist.checkpoint.hf.tensors import (FUSED, HUB, IGNORED_SUFFIXES, HFTensor, Mapping, expert_names,
                                             mtp_shared_copies, tensor_plan)
from moe_dist.common.config import ConfigError, to_dict
from moe_dist.model.config import ModelConfig, parse_model_config

RUN_CONFIG_FILE = "run_config.yaml"
# What import-hf does with multi-token prediction (DeepSeek-V3's MTP module, stored as layer
# num_hidden_layers): "auto" imports it where the checkpoint has one (model.mtp_layers 1, what
# continued pretraining wants) and builds none where it has none; "drop" leaves it out; "fresh"
# adds a freshly initialised MTP block to a checkpoint that has none.
MTP_CHOICES = ("auto", "drop", "fresh")
# The architectures whose checkpoints carry MTP layers (GLM-4.5's are not mapped: --mtp drop only).
MTP_ARCHS = ("deepseek_v3", "glm4_moe")
# The seed of a fresh MTP block's weights (MTPBlock's own draw, independent of train.seed).
FRESH_MTP_SEED = 0


def hf_model_config(hf_dir: str, mtp_layers: int = 0) -> tuple[Arch, ModelConfig, dict[str, Any]]:
    """The architecture, moe_dist ModelConfig and the `model:` / `moe:` sections it was parsed
    from (only what differs from moe_dist's defaults) of `hf_dir`'s config.json; no tensor read."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    arch, model, moe = moe_dist_sections(read_hf_config(hf_dir), path)
    if mtp_layers:
        model["mtp_layers"] = mtp_layers
    try:
        return arch, parse_model_config(model, moe), {"model": model, "moe": moe}
    except ConfigError as e:
        raise CheckpointError(f"{path}: the {arch.hf_class} config is not a valid moe_dist model: {e}") from None


def _layout(arch: Arch, cfg: ModelConfig, weights: HFWeights, layer: int | None = None) -> str:
    """The experts' on-disk layout ("hub" or "fused"), from `layer` (default: the first MoE layer)."""
    if not cfg.moe_layer_indices:
        return HUB
    layer = cfg.moe_layer_indices[0] if layer is None else layer
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


def _mtp_decision(arch: Arch, cfg: ModelConfig, weights: HFWeights, config: dict[str, Any], config_path: str,
                  mode: str) -> str:
    """What becomes of multi-token prediction: "imported", "dropped", "fresh" or "none"."""
    layers = sorted({i for i in map(_layer_of, weights.names()) if i is not None and i >= cfg.n_layers})
    if not layers:
        return "fresh" if mode == "fresh" else "none"
    where = f"{weights.hf_dir!r} holds multi-token prediction weights (layers {layers}, past num_hidden_layers " \
            f"{cfg.n_layers})"
    if mode == "drop" and arch.name in MTP_ARCHS:
        return "dropped"
    if mode == "fresh":
        raise CheckpointError(f"{where}; --mtp fresh initialises an MTP block for a checkpoint without one: use "
                              f"--mtp auto to import it or --mtp drop to leave it out")
    if arch.name != "deepseek_v3":
        raise CheckpointError(f"{where}; moe_dist maps DeepSeek-V3's MTP module only, not {arch.display}'s: import "
                              f"with --mtp drop to leave it out" if arch.name in MTP_ARCHS else
                              f"{where}; {arch.display} has no multi-token prediction and moe_dist does not drop "
                              f"weights")
    declared = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0))
    if layers != [cfg.n_layers] or declared != 1:
        raise CheckpointError(f"{where}, and {config_path!r} has num_nextn_predict_layers {declared!r}; moe_dist "
                              f"imports one MTP module, layer {cfg.n_layers} with num_nextn_predict_layers 1 "
                              f"(--mtp drop leaves them out)")
    return "imported"


def _check_tensors(plan: list[Mapping], weights: HFWeights, cfg: ModelConfig, config_path: str,
                   copies: dict[str, HFTensor] | None = None, drop_from: int | None = None) -> None:
    """Every tensor the plan reads exists with the shape config.json implies; nothing else is there.
    `copies`: tensors read only to check them (the MTP layer's embedding and head); `drop_from`:
    layers from this index on are left out on purpose (--mtp drop)."""
    wanted = {s.name: s for m in plan for s in m.sources}
    wanted.update({name: HFTensor(name, main.shape, main.fields) for name, main in (copies or {}).items()})
    missing = [n for n in wanted if n not in weights]
    if missing:
        raise CheckpointError(f"{weights.hf_dir!r} lacks {len(missing)} tensor(s) that {config_path!r} implies, "
                              f"e.g. {missing[:3]}")
    for name, src in wanted.items():
        shape = weights.shape(name)
        if shape != src.shape:
            raise CheckpointError(f"{weights.path_of(name)!r}: tensor {name} has shape {shape}, but {config_path!r} "
                                  f"({src.fields}) implies {src.shape}")
    dropped = {n for n in weights.names() if drop_from is not None and (_layer_of(n) is not None)
               and _layer_of(n) >= drop_from}
    extra = [n for n in weights.names() if n not in wanted and n not in dropped and not n.endswith(IGNORED_SUFFIXES)]
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # a tied copy some exporters write; checked equal in read_hf_model
    if extra:
        raise CheckpointError(f"{weights.hf_dir!r} holds {len(extra)} tensor(s) that {config_path!r} does not "
                              f"account for, e.g. {sorted(extra)[:3]} (in {weights.path_of(extra[0])!r}); moe_dist "
                              f"does not drop weights")


def read_hf_model(hf_dir: str, *, dtype: str | None = None, progress: bool = False,
                  mtp: str = "auto") -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, ep_size-1 state dict) of the Hugging Face model in `hf_dir`, buffers included,
    so `MoETransformer(cfg).load_state_dict(state)` takes it. `dtype` ("fp32", "bf16") casts the
    floating tensors; default: as stored. `mtp`: one of MTP_CHOICES."""
    _, cfg, _, state, _ = _read(hf_dir, dtype, progress, mtp)
    return cfg, state


def _fresh_mtp_state(cfg: ModelConfig) -> dict[str, Tensor]:
    from moe_dist.model.mtp import MTPBlock
    from moe_dist.parallel.groups import ParallelGroups

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_MTP_SEED)
        block = MTPBlock(cfg, seed=FRESH_MTP_SEED, groups=ParallelGroups.single())
    return {f"blocks.{cfg.n_layers}.{name}": t.detach() for name, t in block.state_dict().items()}


def _read(hf_dir: str, dtype: str | None, progress: bool,
          mtp: str) -> tuple[Arch, ModelConfig, dict[str, Any], dict[str, Tensor], str]:
    check_option("mtp", mtp, MTP_CHOICES)
    cast = torch_dtype(dtype)
    arch, cfg, sections = hf_model_config(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    state: dict[str, Tensor] = {}
    config = read_hf_config(hf_dir)
    rope_interleave = bool(config.get("rope_interleave", arch.defaults.get("rope_interleave", True)))
    with HFWeights(hf_dir) as weights:
        decision = _mtp_decision(arch, cfg, weights, config, config_path, mtp)
        if decision in ("imported", "fresh"):
            arch, cfg, sections = hf_model_config(hf_dir, mtp_layers=1)
        main_layers = replace_mtp_layers(cfg, 0)
        copies = mtp_shared_copies(arch, cfg) if decision == "imported" else {}
        plan = tensor_plan(arch, cfg if decision == "imported" else main_layers, _layout(arch, cfg, weights),
                           rope_interleave=rope_interleave,
                           mtp_layout=_layout(arch, cfg, weights, cfg.n_layers)
                           if copies and cfg.is_moe_layer(cfg.n_layers) else None)
        _check_tensors(plan, weights, cfg, config_path, copies, cfg.n_layers if decision == "dropped" else None)
        from tqdm import tqdm

        for m in tqdm(plan, desc=f"import {arch.hf_class}", unit="tensor", disable=not progress):
            t = m.to_moe_dist([weights.tensor(s.name) for s in m.sources]).contiguous()
            state[m.target] = t.to(cast) if cast is not None and t.is_floating_point() else t
        if cfg.tie_embeddings and "lm_head.weight" in weights and not torch.equal(
                weights.tensor("lm_head.weight"), weights.tensor("model.embed_tokens.weight")):
            raise CheckpointError(f"{config_path!r} sets tie_word_embeddings, but lm_head.weight in "
                                  f"{weights.path_of('lm_head.weight')!r} differs from model.embed_tokens.weight")
        for name, main in copies.items():  # moe_dist's MTP block shares them: a different copy has no place
            if not torch.equal(weights.tensor(name), weights.tensor(main.name)):
                raise CheckpointError(f"{weights.path_of(name)!r}: the MTP layer's {name} differs from {main.name}; "
                                      f"moe_dist's MTP block shares the main model's embedding and head (as "
                                      f"DeepSeek-V3 trains them), so it cannot hold its own copy")
    if decision == "fresh":
        state.update({k: v.to(cast) if cast is not None and v.is_floating_point() else v
                      for k, v in _fresh_mtp_state(cfg).items()})
    return arch, cfg, sections, state, decision


def replace_mtp_layers(cfg: ModelConfig, mtp_layers: int) -> ModelConfig:
    """`cfg` with `model.mtp_layers` set (the plan of the main model alone: 0)."""
    if cfg.mtp_layers == mtp_layers:
        return cfg
    sections = to_dict(cfg)
    moe = sections.pop("moe")
    return parse_model_config({**sections, "mtp_layers": mtp_layers}, moe)


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
              progress: bool = True, mtp: str = "auto") -> str:
    """Write the consolidated checkpoint of `hf_dir` and its run config (OUT/run_config.yaml) to
    the directory `out` (staged: nothing is written unless everything succeeded); returns `out`.
    `mtp`: one of MTP_CHOICES; what became of it is the metadata's source.mtp."""
    check_output(out, overwrite)
    arch, cfg, minimal, state, mtp_decision = _read(hf_dir, dtype, progress, mtp)
    read_plan_config = replace_mtp_layers(cfg, 0) if mtp_decision == "fresh" else cfg  # what came from hf_dir
    sections = {"model": to_dict(cfg)}
    sections["moe"] = sections["model"].pop("moe")
    # The HF directory is the tokenizer (export-hf copies its files and special ids back).
    data = {"tokenizer": {"kind": "hf", "path": os.path.abspath(hf_dir)}}
    meta = {"config": {**sections, "data": data}, "step": None, "tokenizer": None, "weights": "module",
            "dtype": dtype or "as saved",
            "buffers": sorted(m.target for m in tensor_plan(arch, read_plan_config) if not m.sources),
            "source": {"hf_dir": os.path.abspath(hf_dir), "architecture": arch.hf_class, "mtp": mtp_decision}}
    bf16 = state["embed.weight"].dtype == torch.bfloat16
    with staged_directory(out, overwrite) as tmp:
        weights = os.path.join(tmp, WEIGHT_FILES[SAFETENSORS])
        write_weights(weights, state, SAFETENSORS, metadata={"format": FORMAT})
        write_json(os.path.join(tmp, META_FILE), {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "weights_file": os.path.basename(weights), **meta})
        with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
            f.write(run_config(minimal, hf_dir, out, bf16))
    return out

