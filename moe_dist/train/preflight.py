"""Every check that can fail a run, done before any process group, model or dataset index
exists: a bad value must cost a second, not a cluster allocation. Each error names the numbers.

Checked when the config is parsed (config.py / the data and MoE configs): unknown keys, value
ranges, `moe.num_experts % moe.ep_size`, data and tokenizer files exist and are not empty.
Checked here, against the launch: world size vs ep_size, batch sizes vs the DeepSpeed JSON,
tokenizer vocabulary vs the model, domain labels vs `model.num_labels`, the checkpoint folder.
Data (moe_dist/data/index_check.py): every `.bin` has the size its `.idx` implies, every prefix
gives each requested split at least one document, no token id reaches the vocabulary. Start
points: `train.init_from` holds only finite tensors (finite_check.py); `--resume` finds whole
files and a stored config this run can continue (resume_check.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from moe_dist.checkpoint.consolidated import META_FILE, ConsolidatedCheckpoint, check_same_frozen_constants
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.layout import read_latest
from moe_dist.common.config import ConfigError
from moe_dist.data.config import DataConfig
from moe_dist.data.datasets import blend_domain_names
from moe_dist.data.index_check import check_split_shares, check_token_ids, read_index
from moe_dist.data.tokenizers import build_tokenizer, validate_tokenizer_vocab
from moe_dist.model.config import ModelConfig
from moe_dist.parallel.groups import validate_parallel_sizes
from moe_dist.train import run_dir
from moe_dist.train.config import RunConfig
from moe_dist.train.ds_config import load_json, reconcile_deepspeed_config
from moe_dist.train.finite_check import check_init_from_finite
from moe_dist.train.resume_check import check_resume


@dataclass
class Preflight:
    ds_config: dict[str, Any]
    tokenizer: Any
    domain_names: list[str]
    run: run_dir.RunDir | None = None  # rank 0's lock on the checkpoint directory and the run id
    # Order- or routing-changing settings a --resume --allow_config_change accepted.
    config_changes: list[str] | None = None


def requested_samples(train, global_batch: int, world_size: int) -> tuple[int, int]:
    """(train, valid) samples the trainer builds datasets of; the data is checked against them."""
    return train.steps * global_batch, train.eval_batches(world_size) * train.micro_batch * world_size


def data_domain_names(data: DataConfig) -> list[str]:
    """Domain names the data will carry, read from label sidecars (cheap: no index is built)."""
    if data.kind == "synthetic":
        return [f"domain{d}" for d in range(data.synthetic.num_domains)]
    return blend_domain_names(data.megatron.prefixes)


def check_checkpoint_dir(checkpoint_dir: str | None, resume: bool) -> None:
    if resume:
        if not checkpoint_dir:
            raise ConfigError("--resume needs train.checkpoint_dir")
        if read_latest(checkpoint_dir) is None:
            raise ConfigError(f"--resume: no complete checkpoint in train.checkpoint_dir "
                              f"{checkpoint_dir!r} (no 'latest' file)")
    elif checkpoint_dir and read_latest(checkpoint_dir) is not None:
        raise ConfigError(
            f"train.checkpoint_dir {checkpoint_dir!r} already holds checkpoint "
            f"{read_latest(checkpoint_dir)!r}; pass --resume to continue it or choose an "
            f"empty folder (a fresh run would overwrite it)")


def check_init_from(path: str | None, model: ModelConfig, seed: int) -> None:
    """A consolidated checkpoint's metadata must be readable, its tensors finite and its frozen
    constants drawable by this run's model (`seed`: train.seed) before any process starts."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from {path!r} is not a directory; expected the output folder of "
                          f"'tools/convert_checkpoint.py consolidate'")
    try:
        ckpt = ConsolidatedCheckpoint.open(path)
        check_same_frozen_constants(ckpt.config, model, seed, os.path.join(path, META_FILE))
        check_init_from_finite(path)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None


def check_megatron_data(data: DataConfig, tokenizer, model_vocab_size: int, train_samples: int,
                        valid_samples: int) -> None:
    """Index/size agreement, documents per split share, largest token id; reads each .idx and
    at most FULL_SCAN_BYTES (else a sample) of each .bin."""
    if data.kind != "megatron":
        return
    limit = min(tokenizer.vocab_size, model_vocab_size)
    limit_name = (f"the tokenizer's vocab_size ({type(tokenizer).__name__}, data.tokenizer.kind "
                  f"{data.tokenizer.kind!r}; model.vocab_size {model_vocab_size})")
    requested = {"train": train_samples, "valid": valid_samples}
    for i, prefix in enumerate(data.megatron.prefixes):
        where = f"data.megatron.prefixes[{i}]"
        summary = read_index(where, prefix)
        check_split_shares(where, summary, data.megatron.split, requested)
        check_token_ids(where, summary, limit, limit_name)


def preflight(cfg: RunConfig, world_size: int, ds_config_path: str, resume: bool = False,
              allow_config_change: bool = False, break_lock: bool = False,
              run: run_dir.RunDir | None = None) -> Preflight:
    moe = cfg.model.moe
    if moe is not None:
        validate_parallel_sizes(world_size, moe.ep_size, moe.num_experts)
    ds_config = reconcile_deepspeed_config(load_json(ds_config_path), cfg.train, world_size,
                                           ds_config_path)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    try:
        validate_tokenizer_vocab(tokenizer, cfg.model.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    domain_names = data_domain_names(cfg.data)
    if cfg.model.num_labels and len(domain_names) > cfg.model.num_labels:
        raise ConfigError(f"the data carries {len(domain_names)} domains {domain_names} but "
                          f"model.num_labels is {cfg.model.num_labels}; set it to at least "
                          f"{len(domain_names)}")
    train_samples, valid_samples = requested_samples(cfg.train, ds_config["train_batch_size"], world_size)
    check_megatron_data(cfg.data, tokenizer, cfg.model.vocab_size, train_samples, valid_samples)
    # The lock first: the checks of the directory's contents mean something only under it.
    run = run or run_dir.claim(cfg.train.checkpoint_dir, resume, break_lock)
    changes = None
    try:
        check_checkpoint_dir(cfg.train.checkpoint_dir, resume)
        if resume:
            if run is not None:
                run_dir.check_resume_tag(cfg.train.checkpoint_dir)
            changes = check_resume(cfg.train.checkpoint_dir, cfg.to_dict(), world_size, allow_config_change)
        else:
            check_init_from(cfg.train.init_from, cfg.model, cfg.train.seed)  # --resume ignores init_from
        if run is not None:
            run.clean()
    except BaseException:
        if run is not None:
            run.release()
        raise
    return Preflight(ds_config=ds_config, tokenizer=tokenizer, domain_names=domain_names, run=run,
                     config_changes=changes)
