"""The order of the checks (the package docstring says what each one covers); the lock on the
checkpoint folder comes before the checks of its contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_dist.checkpoint.training import check_checkpoint_dir, check_latest_tag, check_resume
from moe_dist.common.config import ConfigError
from moe_dist.data.tokenizers import build_tokenizer, validate_tokenizer_vocab
from moe_dist.train.config import RunConfig, check_world_size
from moe_dist.train.ds_config import load_json, reconcile_deepspeed_config
from moe_dist.train.preflight.data import check_megatron_data, data_domain_names, input_identity
from moe_dist.train.preflight.memory import check_memory
from moe_dist.train.preflight.start import check_hash_token_counts, check_init_from
from moe_dist.train.safety import run_dir


@dataclass
class Preflight:
    ds_config: dict[str, Any]
    tokenizer: Any
    domain_names: list[str]
    run: run_dir.RunDir | None = None  # rank 0's lock on the checkpoint directory and the run id
    # Order- or routing-changing settings a --resume --allow_config_change accepted.
    config_changes: list[str] | None = None
    # The tokenizer's and the data's identity (input_identity), recorded in every checkpoint.
    inputs: dict[str, Any] | None = None


def requested_samples(train, global_batch: int, world_size: int) -> tuple[int, int]:
    """(train, valid) samples the trainer builds datasets of; the data is checked against them."""
    return train.steps * global_batch, train.eval_batches(world_size) * train.micro_batch * world_size


def preflight(cfg: RunConfig, world_size: int, ds_config_path: str, resume: bool = False,
              allow_config_change: bool = False, break_lock: bool = False,
              run: run_dir.RunDir | None = None) -> Preflight:
    check_world_size(cfg.model, world_size)
    ds_config = reconcile_deepspeed_config(load_json(ds_config_path), cfg.train, world_size,
                                           ds_config_path)
    check_memory(cfg, ds_config, world_size)
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
    check_megatron_data(cfg.data, tokenizer, cfg.model.vocab_size, train_samples, valid_samples,
                        check_tokenizer_records=not resume)
    inputs = input_identity(cfg.data, tokenizer)
    # The lock first: the checks of the directory's contents mean something only under it.
    run = run or run_dir.claim(cfg.train.checkpoint_dir, resume, break_lock)
    changes = None
    try:
        check_checkpoint_dir(cfg.train.checkpoint_dir, resume)
        if resume:
            if run is not None:
                check_latest_tag(cfg.train.checkpoint_dir)
            changes = check_resume(cfg.train.checkpoint_dir, cfg.to_dict(), world_size, allow_config_change,
                                   inputs=inputs)
        else:
            check_init_from(cfg.train.init_from, cfg.model, cfg.train.seed)  # --resume ignores init_from
            if cfg.train.init_from is None:
                check_hash_token_counts(cfg.model)
        if run is not None:
            run.clean()
    except BaseException:
        if run is not None:
            run.release()
        raise
    return Preflight(ds_config=ds_config, tokenizer=tokenizer, domain_names=domain_names, run=run,
                     config_changes=changes, inputs=inputs)
