"""The consolidated format: one world-size-independent state dict of the whole model, and the
metadata to rebuild it, in a directory:

    OUT/model.safetensors (or model.pt)   the ep_size=1 `MoETransformer.state_dict()`: experts
                                          stacked [E, ...] under global ids, buffers included
    OUT/moe_dist.json                     config (moe.ep_size 1), step, tokenizer, provenance

`consolidate` writes it from a training checkpoint (any EP size, any world size, ZeRO-1/2): the
weights are the module's (what the model computed with), or with `master_weights` the fp32
master copies rebuilt from the ZeRO partitions (what the optimizer holds; differs from the module
only under bf16). Buffers (router statistics, frozen projections) are never in the optimizer and
always come from the module. `save_consolidated` writes it from a single-process model.

`open_checkpoint` opens what a user points a tool at, a consolidated directory or else a training
checkpoint, and `full_state_dict` gives either one's whole model in this format's names: all
that `inspect` and `export-hf` need.

`load_consolidated` puts it into a model of any EP size, each rank reading only its own expert
slice (safetensors are read lazily, so a rank never holds other ranks' experts).

Names are today's: a file written before the parameters' rename (`moe_dist.moe.legacy_names`) is
read under the new names (its weights by `_WeightsReader`, its buffer list when opened).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_dist.checkpoint.files import (SAFETENSORS, WEIGHT_FORMATS, CheckpointError, cast_floating,
                                       check_option, check_output, dtype_name, load_pt, read_json,
                                       staged_directory, torch_dtype, write_json, write_weights)
from moe_dist.checkpoint.training import ENGINE_PREFIX, TrainingCheckpoint, check_supported, read_zero_state
from moe_dist.common.config import ConfigError, to_dict
from moe_dist.model.config import ModelConfig, parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.legacy_names import migrate_keys, migrate_names

META_FILE = "moe_dist.json"
FORMAT = "moe_dist.consolidated"
FORMAT_VERSION = 1
WEIGHT_FILES = {"safetensors": "model.safetensors", "torch": "model.pt"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
                       "BOOL": "bool", "F64": "float64"}
# Config keys that decide which tensors exist and their shapes: a model to load into must agree.
_STRUCTURE = {"model": ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "moe_every", "moe_offset",
                        "activation", "tie_embeddings"),
              "moe": ("num_experts", "d_ff", "activation", "num_shared_experts")}


def model_seed(config: dict[str, Any]) -> int:
    """The seed the model of a checkpoint's run config was built with (`MoETransformer(seed=)`):
    the trainer's `train.seed`, which every stored run config holds resolved; 0 for a model saved
    without one (`MoETransformer`'s default)."""
    return int((config.get("train") or {}).get("seed", 0))


def check_same_frozen_constants(stored: dict[str, Any], cfg: ModelConfig, seed: int, where: str) -> None:
    """COMET's expert-mask projections are drawn from the model seed and not saved: a model built
    with another seed computes other masks with the checkpoint's weights."""
    drawn = model_seed(stored)
    if cfg.moe is None or cfg.moe.comet_active_fraction is None or drawn == seed:
        return
    raise CheckpointError(f"{where}: its COMET expert masks (moe.comet_active_fraction) were drawn with seed "
                          f"{drawn} (train.seed of the run that wrote it), this model's with seed {seed}; build "
                          f"the model with seed {drawn} (train.seed: {drawn}) to compute the trained function")


def single_rank_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config with moe.ep_size 1: the layout the consolidated tensors are in."""
    config = copy.deepcopy(config)
    if config.get("moe"):
        config["moe"]["ep_size"] = 1
    return config


def write_consolidated(out: str, state: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str,
                       overwrite: bool, extra_files: dict[str, str] | None = None) -> str:
    """Write weights and metadata (and `extra_files`: name -> text, e.g. a run config) as the
    directory `out` (staged: all or nothing); returns `out`."""
    with staged_directory(out, overwrite) as tmp:
        weights = os.path.join(tmp, WEIGHT_FILES[fmt])
        write_weights(weights, state, fmt, metadata={"format": FORMAT} if fmt == SAFETENSORS else None)
        write_json(os.path.join(tmp, META_FILE), {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "weights_file": os.path.basename(weights), **meta})
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    return out


def save_consolidated(model: MoETransformer, out: str, *, data: dict[str, Any] | None = None, step: int | None = None,
                      fmt: str = SAFETENSORS, overwrite: bool = False) -> str:
    """Write a single-process (ep_size 1) model in the consolidated format, e.g. after fine-tuning
    or evaluation outside the trainer; `data` is the run config's data section (it names the
    tokenizer for export-hf; default: the byte tokenizer)."""
    if model.cfg.moe is not None and model.cfg.moe.ep_size != 1:
        raise CheckpointError(f"save_consolidated needs an ep_size 1 model (all experts in one process), got "
                              f"ep_size {model.cfg.moe.ep_size}; use `consolidate` on a training checkpoint")
    config = {"model": to_dict(model.cfg), "data": data or {"tokenizer": {"kind": "byte", "model": None}},
              "train": {"seed": model.seed}}  # model_seed
    config["moe"] = config["model"].pop("moe")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    meta = {"config": config, "step": step, "tokenizer": None, "weights": "module", "dtype": "as saved",
            "buffers": sorted(name for name, _ in model.named_buffers() if name in state), "source": None}
    return write_consolidated(out, state, meta, fmt, overwrite)


@dataclass
class ConsolidatedCheckpoint:
    path: str  # the directory
    meta: dict[str, Any]
    model_cfg: ModelConfig

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, self.meta["weights_file"])

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def recorded_tokenizer(self) -> dict[str, Any] | None:
        return self.meta.get("tokenizer")

    @classmethod
    def is_consolidated(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, META_FILE))

    @classmethod
    def open(cls, path: str) -> "ConsolidatedCheckpoint":
        meta_path = os.path.join(path, META_FILE)
        meta = read_json(meta_path, "consolidated metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path!r} is not moe_dist consolidated metadata (format "
                                  f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path!r} has format_version {meta.get('format_version')!r}; this "
                                  f"moe_dist reads version {FORMAT_VERSION}")
        try:
            model_cfg = parse_model_config(meta["config"]["model"], meta["config"].get("moe"))
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path!r}: the stored model config is invalid: {e}") from None
        if meta.get("buffers") is not None:
            meta["buffers"] = migrate_names(meta["buffers"])
        ckpt = cls(path=path, meta=meta, model_cfg=model_cfg)
        if not os.path.isfile(ckpt.weights_path):
            raise CheckpointError(f"missing weights file {ckpt.weights_path!r} (named by {meta_path!r})")
        return ckpt

    def state_dict(self) -> dict[str, torch.Tensor]:
        with _WeightsReader(self.weights_path) as reader:
            return {name: reader.tensor(name) for name in reader.names()}


class _WeightsReader:
    """Tensors (or dim-0 slices of them) of a safetensors or torch weights file by (today's) name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = None
        self._open_handle = contextlib.ExitStack()  # closes the safetensors handle
        self._state: dict[str, torch.Tensor] | None = None
        self._stored: dict[str, str] = {}  # today's name -> the name in the file

    def __enter__(self) -> "_WeightsReader":
        if self.path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._handle = self._open_handle.enter_context(safe_open(self.path, framework="pt"))
            except Exception as e:  # SafetensorError for a bad header, OSError for a short file
                raise CheckpointError(f"cannot read weights file {self.path!r} ({type(e).__name__}: {e}); "
                                      f"the file is truncated or corrupted") from None
        else:
            self._state = load_pt(self.path, "consolidated weights")
        stored = self._handle.keys() if self._handle is not None else self._state
        try:
            self._stored = migrate_keys({name: name for name in stored}, repr(self.path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return self

    def __exit__(self, *exc) -> None:
        self._open_handle.close()

    def names(self) -> list[str]:
        return list(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._stored.get(name, name)
        if self._handle is not None:
            return tuple(self._handle.get_slice(name).get_shape())
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> str:
        """torch's dtype name ("float32", "bfloat16", "int64", ...)."""
        name = self._stored.get(name, name)
        if self._handle is not None:
            return _SAFETENSORS_DTYPES.get(self._handle.get_slice(name).get_dtype(), "unknown")
        return dtype_name(self._state[name].dtype)

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        name = self._stored.get(name, name)
        try:
            if self._handle is not None:
                return self._handle.get_slice(name)[rows] if rows else self._handle.get_tensor(name)
            return self._state[name][rows] if rows else self._state[name]
        except Exception as e:  # a header that promises more bytes than the file has
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path!r} ({type(e).__name__}: {e}); "
                                  f"the file is truncated or corrupted") from None


def tensor_shapes(weights_path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shape and dtype name of every tensor of a weights file (safetensors: header only)."""
    with _WeightsReader(weights_path) as reader:
        names = reader.names()
        return {n: reader.shape(n) for n in names}, {n: reader.dtype(n) for n in names}


# ---- from a training checkpoint (or either kind) -----------------------------------------------

def open_checkpoint(path: str, tag: str | None = None) -> TrainingCheckpoint | ConsolidatedCheckpoint:
    if tag is None and ConsolidatedCheckpoint.is_consolidated(path):
        return ConsolidatedCheckpoint.open(path)
    return TrainingCheckpoint.open(path, tag)


def full_state_dict(ckpt: TrainingCheckpoint | ConsolidatedCheckpoint, master_weights: bool = False,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """The ep_size=1 state dict of the checkpoint's model (module or fp32 master weights)."""
    if isinstance(ckpt, ConsolidatedCheckpoint):
        if master_weights:
            raise CheckpointError(f"{ckpt.path!r} is already consolidated ({ckpt.meta.get('weights')} weights); "
                                  f"--master-weights needs a training checkpoint with ZeRO files")
        return ckpt.state_dict()
    state = ckpt.module_state(progress)
    if not master_weights:
        return state
    master = read_zero_state(ckpt, progress).master
    unknown = sorted(set(master) - set(state))
    if unknown:
        raise CheckpointError(f"the ZeRO files of {ckpt.tag_dir!r} hold parameters {unknown} that "
                              f"{ckpt.main_path!r} does not")
    return {name: master.get(name, t) for name, t in state.items()}


def consolidate(ckpt_path: str, out: str, *, tag: str | None = None, master_weights: bool = False,
                dtype: str | None = None, fmt: str = SAFETENSORS, overwrite: bool = False,
                progress: bool = True) -> str:
    """Write the consolidated checkpoint of `ckpt_path` to the directory `out`; returns `out`."""
    cast = torch_dtype(dtype)
    check_option("weight format", fmt, WEIGHT_FORMATS)
    check_output(out, overwrite)
    ckpt = TrainingCheckpoint.open(ckpt_path, tag)
    if master_weights:
        check_supported(ckpt)
    state = cast_floating(full_state_dict(ckpt, master_weights, progress), cast)
    meta = {
        "config": single_rank_config(ckpt.config),
        "step": ckpt.step,
        "tokenizer": ckpt.recorded_tokenizer,
        "weights": "master" if master_weights else "module",
        # Not parameters: counted apart by `inspect`, never in an optimizer.
        "buffers": sorted(n[len(ENGINE_PREFIX):] for n in ckpt.main.get("buffer_names", [])),
        "dtype": dtype or "as saved",
        "source": {"checkpoint": os.path.abspath(ckpt.tag_dir), "ep_size": ckpt.ep_size,
                   "world_size": ckpt.world_size, "zero_stage": ckpt.zero_stage, "bf16": ckpt.bf16},
    }
    return write_consolidated(out, state, meta, fmt, overwrite)


# ---- into a model of any EP size ---------------------------------------------------------------

def check_structure(stored: dict[str, Any], cfg: ModelConfig, where: str) -> None:
    """The stored run config `stored` builds a model of `cfg`'s structure (else its tensors cannot load)."""
    ours = {"model": to_dict(cfg), "moe": to_dict(cfg.moe) if cfg.moe else None}
    ours["model"].pop("moe")
    for section, keys in _STRUCTURE.items():
        if (stored.get(section) is None) != (ours[section] is None):
            raise CheckpointError(f"{where}: the checkpoint {'has' if stored.get(section) else 'lacks'} a "
                                  f"{section!r} section, the model does not")
        for key in keys if ours[section] is not None else ():
            if stored[section].get(key) != ours[section][key]:
                raise CheckpointError(f"{where}: {section}.{key} is {stored[section].get(key)!r} in the "
                                      f"checkpoint but {ours[section][key]!r} in the model")
    stored_mtp = stored["model"].get("mtp_layers", 0)  # checkpoints from before MTP have none
    if stored_mtp != cfg.mtp_layers:
        raise CheckpointError(f"{where}: model.mtp_layers is {stored_mtp} in the checkpoint but {cfg.mtp_layers} in "
                              f"the model: " + (
                                  f"the checkpoint has no MTP block (blocks.{cfg.n_layers}.*) to load; set "
                                  f"model.mtp_layers 0, or give it one (import-hf --mtp fresh adds a freshly "
                                  f"initialised block)" if cfg.mtp_layers else
                                  f"the model has no place for the checkpoint's MTP block (blocks.{cfg.n_layers}.*); "
                                  f"set model.mtp_layers {stored_mtp}, or re-import without it (import-hf --mtp drop)"))
    if ours["moe"] is not None and stored["moe"]["router"]["type"] != cfg.moe.router.type:
        raise CheckpointError(f"{where}: moe.router.type is {stored['moe']['router']['type']!r} in the "
                              f"checkpoint but {cfg.moe.router.type!r} in the model")


def _expert_slices(model: MoETransformer) -> dict[str, slice]:
    """Stacked expert tensor name -> this rank's rows of the global [E, ...] tensor."""
    out = {}
    for layer_index, moe in model.moe_layers():
        rows = slice(moe.first_expert, moe.first_expert + moe.cfg.num_local_experts)
        for name, _ in moe.experts.named_parameters():
            out[f"blocks.{layer_index}.moe.experts.{name}"] = rows
    return out


def load_consolidated(model: nn.Module, path: str) -> None:
    """Load a consolidated checkpoint (its directory or weights file) into `model`, a
    `MoETransformer` of any EP size (or the trainer's engine module around one): dense tensors
    whole, this rank's experts as rows [first_expert, first_expert + num_local) of each stacked
    tensor. Every tensor must be present with the right shape (strict)."""
    target = model.model if isinstance(getattr(model, "model", None), MoETransformer) else model
    if not isinstance(target, MoETransformer):
        raise TypeError(f"load_consolidated needs a MoETransformer, got {type(model).__name__}")
    if os.path.isdir(path):
        ckpt = ConsolidatedCheckpoint.open(path)
        check_structure(ckpt.config, target.cfg, os.path.join(path, META_FILE))
        check_same_frozen_constants(ckpt.config, target.cfg, target.seed, os.path.join(path, META_FILE))
        weights = ckpt.weights_path
    else:
        weights = path
        if not os.path.isfile(weights):
            raise CheckpointError(f"consolidated checkpoint {path!r} does not exist")
    slices = _expert_slices(target)
    expected = target.state_dict()
    with _WeightsReader(weights) as reader:
        names = set(reader.names())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{weights!r} does not match the model: missing {missing}, unexpected "
                                  f"{unexpected}")
        state = {}
        for name, ref in expected.items():
            shape = reader.shape(name)
            want = ((target.cfg.moe.num_experts, *ref.shape[1:]) if name in slices else tuple(ref.shape))
            if shape != tuple(want):
                raise CheckpointError(f"{weights!r}: {name} has shape {shape}, the model expects {tuple(want)}")
            state[name] = reader.tensor(name, slices.get(name))
    target.load_state_dict(state, strict=True)
