"""A moe_dist training checkpoint opened for conversion: its DeepSpeed model-states file, the
resolved config the trainer stored in it, and its per-EP-rank expert files merged into one
world-size-independent state dict (experts stacked [E, ...] under global ids).

Everything cheap is checked when the checkpoint is opened, before any expert or ZeRO file is
read, and every inconsistency names the file that disagrees and what was expected. A committed
tag's files are first compared with its completion marker (list, sizes, sha256 digests, run id:
tags.tag_problems), so no conversion reads a corrupted or swapped file.

Tensor names are today's (`moe_dist.moe.legacy_names`): a checkpoint written before the
parameters' rename is migrated as it is read, its model states when opened (so every reader of
`main`, the ZeRO reader and `reshard` included, sees one set of names) and each expert file when
loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from moe_dist.checkpoint.files import CheckpointError, dtype_name, load_pt, require_keys
from moe_dist.checkpoint.training.layout import (CLIENT_KEY, MODEL_STATES, experts_file, is_expert_key, resolve_tag_dir,
                                                 strip_engine_prefix)
from moe_dist.checkpoint.training.tags import tag_problems
from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig, parse_model_config
from moe_dist.moe.legacy_names import migrate_keys, migrate_names

_MAIN_KEYS = ("module", "param_shapes", "dp_world_size", "ds_config", "global_steps", CLIENT_KEY)


def _migrate_names(main: dict[str, Any], path: str) -> None:
    """The tensor names of DeepSpeed's model-states file under today's names (in place): the
    module, the ZeRO groups' parameter shapes (whose order is the groups' flat layout), the
    buffer names and the frozen parameters' shapes."""
    main["module"] = migrate_keys(main["module"], repr(path))
    main["param_shapes"] = [migrate_keys(group, f"{path!r} (param_shapes)") for group in main["param_shapes"]]
    if main.get("buffer_names") is not None:
        main["buffer_names"] = migrate_names(main["buffer_names"])
    if main.get("frozen_param_shapes") is not None:
        main["frozen_param_shapes"] = migrate_keys(main["frozen_param_shapes"], f"{path!r} (frozen_param_shapes)")


@dataclass
class TrainingCheckpoint:
    tag_dir: str
    main: dict[str, Any]  # the loaded mp_rank_00_model_states.pt
    model_cfg: ModelConfig
    ep_size: int
    world_size: int

    @property
    def main_path(self) -> str:
        return os.path.join(self.tag_dir, MODEL_STATES)

    @property
    def client(self) -> dict[str, Any]:
        return self.main[CLIENT_KEY]

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config the trainer saved (sections model, moe, data, train)."""
        return self.client["config"]

    @property
    def step(self) -> int:
        return int(self.client["step"])

    @property
    def recorded_tokenizer(self) -> dict[str, Any] | None:
        """The tokenizer identity the trainer recorded (kind, model path, sha256), if any."""
        return self.client.get("tokenizer")

    @property
    def ds_config(self) -> dict[str, Any]:
        return self.main["ds_config"]

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config.get("bf16", {}).get("enabled", False))

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def num_local_experts(self) -> int:
        return self.model_cfg.moe.num_experts // self.ep_size if self.model_cfg.moe else 0

    @classmethod
    def open(cls, path: str, tag: str | None = None) -> "TrainingCheckpoint":
        tag_dir = resolve_tag_dir(path, tag)
        # Before any file is trusted: the commit's file list, sizes, digests and run id.
        problems = tag_problems(tag_dir)
        if problems:
            raise CheckpointError(f"checkpoint {tag_dir!r} is not the tag that was committed: " + "; ".join(problems))
        main_path = os.path.join(tag_dir, MODEL_STATES)
        main = load_pt(main_path, "DeepSpeed model states", deepspeed=True)
        require_keys(main, _MAIN_KEYS, main_path, "DeepSpeed model states")
        try:
            _migrate_names(main, main_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        client = main[CLIENT_KEY]
        require_keys(client, ("config", "step", "world_size"), main_path, f"client_state[{CLIENT_KEY!r}] of the")
        config = client["config"]
        try:
            model_cfg = parse_model_config(config["model"], config.get("moe"))
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{main_path!r}: the stored model config is invalid: {e}") from None
        ep_size = model_cfg.moe.ep_size if model_cfg.moe else 1
        world = int(main["dp_world_size"])
        if client["world_size"] != world:
            raise CheckpointError(f"{main_path!r}: client_state world_size ({client['world_size']}) differs from "
                                  f"DeepSpeed's dp_world_size ({world})")
        if world % ep_size:
            raise CheckpointError(f"{main_path!r}: world size ({world}) is not divisible by the config's "
                                  f"moe.ep_size ({ep_size})")
        ckpt = cls(tag_dir=tag_dir, main=main, model_cfg=model_cfg, ep_size=ep_size, world_size=world)
        ckpt._check_moe_layers()
        return ckpt

    def _check_moe_layers(self) -> None:
        layers = self.model_cfg.moe_layer_indices
        saved = self.main.get("num_experts") or []
        expected = [self.model_cfg.moe.num_experts] if layers else []
        # DeepSpeed records one entry per `MoE` module; moe_dist registers one marker for all layers.
        if list(saved) != expected:
            raise CheckpointError(f"{self.main_path!r}: DeepSpeed's num_experts is {saved}, but the stored "
                                  f"config gives {expected} (moe.num_experts, MoE layers {layers})")

    def shapes_dtypes_and_buffers(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
        """Global (ep_size=1) shape and dtype of every tensor, and the names of the buffers, from the
        model-states file alone (EP rank 0's experts stand for every rank's)."""
        shapes, dtypes = {}, {}
        for key, t in self.main["module"].items():
            name = strip_engine_prefix(key, self.main_path)
            shape = tuple(t.shape)
            shapes[name] = (shape[0] * self.ep_size, *shape[1:]) if is_expert_key(name) else shape
            dtypes[name] = dtype_name(t.dtype)
        buffers = {strip_engine_prefix(k, self.main_path) for k in self.main.get("buffer_names", [])}
        return shapes, dtypes, buffers

    def expert_names(self) -> list[str]:
        """Bare names of the stacked expert tensors, in the model-states file's order."""
        names = [strip_engine_prefix(k, self.main_path) for k in self.main["module"]]
        return [n for n in names if is_expert_key(n)]

    def local_experts(self, ep_rank: int) -> dict[str, torch.Tensor]:
        """EP rank `ep_rank`'s expert tensors (bare names, [num_local, ...]), checked against
        the model-states file and the config."""
        path = experts_file(self.tag_dir, ep_rank)
        saved = load_pt(path, f"expert (EP rank {ep_rank} of {self.ep_size})")
        require_keys(saved, ("ep_size", "ep_rank", "experts"), path, "expert")
        if saved["ep_size"] != self.ep_size or saved["ep_rank"] != ep_rank:
            raise CheckpointError(f"expert file {path!r} holds ep_size {saved['ep_size']} / ep_rank "
                                  f"{saved['ep_rank']}; the config of {self.main_path!r} expects ep_size "
                                  f"{self.ep_size} / ep_rank {ep_rank}")
        try:
            stored = migrate_keys(saved["experts"], repr(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        experts = {strip_engine_prefix(k, path): v for k, v in stored.items()}
        rank0 = {strip_engine_prefix(k, self.main_path): v for k, v in self.main["module"].items()}
        expected = self.expert_names()
        if sorted(experts) != sorted(expected):
            raise CheckpointError(f"expert file {path!r} holds tensors {sorted(experts)}, expected "
                                  f"{sorted(expected)} (the experts in {self.main_path!r})")
        for name in expected:
            shape, ref = tuple(experts[name].shape), tuple(rank0[name].shape)
            if shape[0] != self.num_local_experts or shape[1:] != ref[1:]:
                raise CheckpointError(f"expert file {path!r}: {name} has shape {shape}, expected "
                                      f"({self.num_local_experts}, {', '.join(map(str, ref[1:]))}) "
                                      f"(num_experts / ep_size local experts)")
        return experts

    def module_state(self, progress: bool = True) -> dict[str, torch.Tensor]:
        """The whole model as the ep_size=1 `MoETransformer.state_dict()`, in the model-states
        file's order: dense tensors and buffers from that file, experts of every EP rank stacked
        in global order."""
        names = self.expert_names()
        shards: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for p in tqdm(range(self.ep_size if names else 0), desc="expert files", unit="file",
                      disable=not progress):
            for name, t in self.local_experts(p).items():
                shards[name].append(t)
        state = {}
        for key, value in self.main["module"].items():
            name = strip_engine_prefix(key, self.main_path)
            state[name] = torch.cat(shards[name], dim=0) if name in shards else value
        return state
