"""Whether a run may write or resume its checkpoint folder (`check_checkpoint_dir`: a fresh run
never overwrites a checkpoint, `--resume` needs one), and what `--resume` checks before any
process group exists: the checkpoint's files are whole, and the run config stored in it
(client_state, written by the trainer at every save) agrees with this run's.

Three kinds of difference (flattened `section.key` paths of `RunConfig.to_dict()`):
- structural (the tensors' shapes or the layout of the files): refused, DeepSpeed's load would
  fail late with a size mismatch; an `ep_size` or world-size change names the `reshard` command;
- free (steps, LR schedule, intervals, folders, CPU settings): accepted silently, as before;
- everything else changes the data order, the routing or the model's math (`train.seed`,
  `data.seed`, `moe.top_k`, capacity factors, router settings, ...): refused with the list,
  unless `--allow_config_change`, which only prints it. Keys added since the checkpoint was
  written (absent there) are not compared: a new key's default keeps the old behaviour.

The inputs behind unchanged paths are compared the same way (`input_differences`): the
tokenizer's identifiers (sha256 of its files) and each data prefix's identity (sizes, sha256 of
the `.idx`, sha256 of a sample of the `.bin`: moe_dist/train/preflight/data.py) against what the
checkpoint recorded. A tokenizer retrained in place or a prefix re-preprocessed is refused unless
`--allow_config_change`. A checkpoint written before the data identity was recorded is compared on
the tokenizer only.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

from moe_dist.checkpoint.files import torch_load
from moe_dist.checkpoint.training.layout import CLIENT_KEY, LATEST, MODEL_STATES, experts_file, read_latest, zero_file
from moe_dist.checkpoint.training.tags import COMPLETE, list_tags
from moe_dist.common.config import ConfigError

STRUCTURAL = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.moe_every",
    "model.moe_offset", "model.activation", "model.tie_embeddings", "model.n_kv_heads", "model.head_dim",
    "model.qk_norm", "model.qkv_bias", "model.attention", "model.q_lora_rank", "model.kv_lora_rank",
    "model.qk_rope_head_dim", "model.qk_nope_head_dim", "model.v_head_dim", "moe.num_experts", "moe.d_ff",
    "moe.activation", "moe.num_shared_experts", "moe.shared_d_ff", "moe.shared_gate", "moe.router.type",
    "moe.hash_layers",
    "model.mtp_layers",
)
FREE_PREFIXES = (
    "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_decay", "train.log_interval",
    "train.decay_steps", "train.decay_shape", "train.wandb", "train.mlflow", "train.run_dir", "train.peak_tflops",
    "train.eval_interval", "train.eval_iters", "train.checkpoint_interval", "train.checkpoint_dir",
    "train.tensorboard_dir", "train.init_from", "train.deepspeed_config", "cpu.", "data.num_workers",
    "data.megatron.cache_dir", "model.activation_checkpointing", "model.num_labels", "model.max_seq_len",
    "model.init_std", "moe.init_std", "moe.expert_impl", "model.mtp_loss_weight",
    # The routing trace observes; trace.replay and trace.replay_weights change the routing.
    "trace.dir", "trace.interval", "trace.layers", "trace.tokens", "trace.eval", "trace.max_file_mb",
    "trace.max_total_mb",
)
RESHARD = "python tools/convert_checkpoint.py reshard"


def committed_tags(checkpoint_dir: str) -> str:
    """'step_00000050, step_00000100 (run id 3f2a...)': the complete tags of a folder, oldest first
    with their run ids; '' for none."""
    complete = [s for s in list_tags(checkpoint_dir) if s.status == COMPLETE]
    if not complete:
        return ""
    ids = sorted({str(s.run_id) for s in complete})
    return f"{', '.join(s.tag for s in complete)} (run id{'s' if len(ids) > 1 else ''} {', '.join(ids)})"


def check_checkpoint_dir(checkpoint_dir: str | None, resume: bool) -> None:
    if resume:
        if not checkpoint_dir:
            raise ConfigError("--resume needs train.checkpoint_dir")
        if read_latest(checkpoint_dir) is None:
            found = committed_tags(checkpoint_dir)
            raise ConfigError(f"--resume: no complete checkpoint in train.checkpoint_dir "
                              f"{checkpoint_dir!r} (no 'latest' file)"
                              + (f"; it holds complete tags {found}: write the name of the one to continue "
                                 f"into {os.path.join(checkpoint_dir, LATEST)!r}" if found else ""))
    elif checkpoint_dir and read_latest(checkpoint_dir) is not None:
        raise ConfigError(
            f"train.checkpoint_dir {checkpoint_dir!r} already holds checkpoint "
            f"{read_latest(checkpoint_dir)!r}; pass --resume to continue it or choose an "
            f"empty folder (a fresh run would overwrite it)")
    elif checkpoint_dir and (found := committed_tags(checkpoint_dir)):
        # Without `latest` the folder is still another run's: a fresh run would overwrite its tags
        # of the same steps in place, and its keep_last would count them.
        raise ConfigError(
            f"train.checkpoint_dir {checkpoint_dir!r} has no 'latest' file but holds complete checkpoints "
            f"{found}; choose an empty folder (a fresh run would overwrite them), or write the tag to "
            f"continue into {os.path.join(checkpoint_dir, LATEST)!r} and pass --resume")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{'moe.router.type': 'topk', ...}; a None section stays one entry ('moe': None)."""
    if not isinstance(config, dict):
        return {prefix: config}
    out = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def is_free(path: str) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) or path.startswith(p + ".")
               for p in FREE_PREFIXES)


BATCH_SPLIT = ("train.micro_batch", "train.grad_accum")


def global_batch(flat: dict[str, Any], world_size: int) -> int | None:
    try:
        return int(flat["train.micro_batch"]) * int(flat["train.grad_accum"]) * world_size
    except (KeyError, TypeError, ValueError):
        return None


def config_differences(stored: dict[str, Any], current: dict[str, Any], stored_world: int = 1,
                       world_size: int = 1, stored_batch: int | None = None) -> tuple[list[str], list[str]]:
    """(structural, order-or-routing) differences, each 'path: stored -> current'.

    How the global batch is split (micro_batch x grad_accum x world) is free: each step still
    reads the same samples (a resharded checkpoint resumed at another world size needs this);
    a different global batch changes the data order and is listed as one difference.
    `stored_batch`: the global batch the checkpoint was trained with (its DeepSpeed config's
    train_batch_size; after `reshard` to another world size the stored config's split no longer
    multiplies out to it), else computed from the stored config."""
    old, new = flatten(stored), flatten(current)
    structural, changed = [], []
    old_batch = stored_batch if stored_batch is not None else global_batch(old, stored_world)
    new_batch = global_batch(new, world_size)
    if old_batch is not None and old_batch != new_batch:
        changed.append(f"global batch (train.micro_batch x train.grad_accum x world size): {old_batch} -> "
                       f"{new.get('train.micro_batch')} x {new.get('train.grad_accum')} x {world_size} = {new_batch}")
    if (stored.get("moe") is None) != (current.get("moe") is None):
        structural.append(f"moe: {'absent' if stored.get('moe') is None else 'present'} -> "
                          f"{'absent' if current.get('moe') is None else 'present'}")
    for path in sorted(set(old) | set(new)):
        if path in ("moe", "moe.ep_size") or path not in old or is_free(path) or path in BATCH_SPLIT:
            continue
        a, b = old[path], new.get(path)
        if a == b:
            continue
        (structural if path in STRUCTURAL else changed).append(f"{path}: {a!r} -> {b!r}")
    return structural, changed


def check_layout(ckpt_dir: str, stored: dict[str, Any], stored_world: int, current: dict[str, Any],
                 world_size: int) -> None:
    """An ep_size or world-size change needs the checkpoint resharded first: say how."""
    old_ep = (stored.get("moe") or {}).get("ep_size", 1)
    new_ep = (current.get("moe") or {}).get("ep_size", 1)
    if old_ep == new_ep and stored_world == world_size:
        return
    out = ckpt_dir.rstrip("/") + f"_ep{new_ep}_w{world_size}"
    raise ConfigError(
        f"--resume: {ckpt_dir!r} was written with moe.ep_size {old_ep} and world size {stored_world}, this run "
        f"has moe.ep_size {new_ep} and world size {world_size}; expert and ZeRO files are laid out per rank, "
        f"so convert the checkpoint first:\n  {RESHARD} {ckpt_dir} {out} --ep-size {new_ep} "
        f"--world-size {world_size}\nand set train.checkpoint_dir to {out!r}")


def check_file_whole(path: str, what: str) -> None:
    """A torch `.pt` is a zip archive whose directory sits at its end: a truncated copy has lost
    it, which zipfile sees from the last bytes alone (no tensor is read)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: missing {what} file {path!r}")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"--resume: {what} file {path!r} ({os.path.getsize(path)} bytes) is truncated or "
                          f"corrupted ({e}); resume from an earlier tag (write its name into 'latest')") from None


def read_stored_state(tag_dir: str) -> dict[str, Any]:
    """The model-states file's own entries, tensors memory-mapped (not read)."""
    path = os.path.join(tag_dir, MODEL_STATES)
    check_file_whole(path, "DeepSpeed model states")
    try:
        return torch_load(path, deepspeed=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (a damaged archive member, a foreign pickle: any error)
        raise ConfigError(f"--resume: cannot read {path!r} ({type(e).__name__}: {e})") from None


DATA_IDENTITY_KEY = "data_identity"  # the trainer's client state: input_identity()["data"]


def _short(digest: Any) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else repr(digest)


def input_differences(client: dict[str, Any], inputs: dict[str, Any] | None) -> list[str]:
    """What changed in the tokenizer's or the data's content since the checkpoint recorded them
    (`client`: the stored client state; `inputs`: this run's input_identity), one entry each."""
    if inputs is None:
        return []
    changed = []
    stored_tok = (client.get("tokenizer") or {}).get("unique_identifiers")
    tok = inputs.get("tokenizer")
    if isinstance(stored_tok, dict) and tok is not None and dict(stored_tok) != dict(tok):
        if stored_tok.get("cls") != tok.get("cls"):
            changed.append(f"data.tokenizer: {stored_tok.get('cls')} -> {tok.get('cls')}")
        else:
            keys = sorted(k for k in set(stored_tok) | set(tok) if stored_tok.get(k) != tok.get(k))
            changed.append("data.tokenizer (same settings, new content: retrained?): " + ", ".join(
                f"{k} {_short(stored_tok.get(k))} -> {_short(tok.get(k))}" for k in keys))
    stored_data = client.get(DATA_IDENTITY_KEY)
    if isinstance(stored_data, list):
        old = {d.get("prefix"): d for d in stored_data if isinstance(d, dict)}
        for d in inputs.get("data") or []:
            was = old.get(d["prefix"])
            if was is None:  # a prefix added or renamed: data.megatron.prefixes lists it already
                continue
            fields = [f"{k} {_short(was.get(k)) if k.endswith('sha256') else was.get(k)} -> "
                      f"{_short(d[k]) if k.endswith('sha256') else d[k]}"
                      for k in ("idx_bytes", "bin_bytes", "idx_sha256", "bin_sample_sha256") if was.get(k) != d[k]]
            if fields:
                # Megatron-Core keys its cached sample indices by path, not content: stale ones would
                # index past the new documents (a ValueError in the data loader).
                changed.append(f"data prefix {d['prefix']!r} (same path, new content): " + ", ".join(fields)
                               + " (to continue on it, also set data.megatron.cache_dir to a new folder)")
    return changed


def check_steps_left(tag_dir: str, client: dict[str, Any], current: dict[str, Any]) -> None:
    """A resume at or past train.steps would load the checkpoint, train nothing and report success."""
    step, steps = client.get("step"), (current.get("train") or {}).get("steps")
    if isinstance(step, int) and isinstance(steps, int) and steps <= step:
        raise ConfigError(f"--resume: train.steps is {steps}, but checkpoint {tag_dir!r} is at step {step}: "
                          f"nothing to train; to continue, raise train.steps above {step} (e.g. --set "
                          f"train.steps={step + max(step // 2, 1)})")


def check_resume(checkpoint_dir: str, current: dict[str, Any], world_size: int,
                 allow_config_change: bool, inputs: dict[str, Any] | None = None) -> list[str]:
    """Refuse a checkpoint with a missing or truncated file or a config (or, `inputs`, a tokenizer
    or data content) this run cannot continue; returns the order- or routing-changing differences
    accepted under allow_config_change."""
    tag = read_latest(checkpoint_dir)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ConfigError(f"--resume: {os.path.join(checkpoint_dir, 'latest')!r} names tag {tag!r}, but "
                          f"{tag_dir!r} does not exist")
    main = read_stored_state(tag_dir)
    client = main.get(CLIENT_KEY) if isinstance(main, dict) else None
    if not isinstance(client, dict) or "config" not in client:
        raise ConfigError(f"--resume: {os.path.join(tag_dir, MODEL_STATES)!r} holds no moe_dist client state "
                          f"(no stored run config); expected a checkpoint written by moe_dist's trainer")
    check_steps_left(tag_dir, client, current)
    stored, stored_world = client["config"], int(client.get("world_size", world_size))
    ds_config = main.get("ds_config") or {}
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    stored_batch = ds_config.get("train_batch_size")
    stored_batch = int(stored_batch) if isinstance(stored_batch, int) else None
    ep = (stored.get("moe") or {}).get("ep_size", 1)
    for r in range(stored_world):
        check_file_whole(zero_file(tag_dir, r, bf16), f"ZeRO optimizer (rank {r})")
    if stored.get("moe"):
        for p in range(ep):
            check_file_whole(experts_file(tag_dir, p), f"expert (EP rank {p})")
    structural, changed = config_differences(stored, current, stored_world, world_size, stored_batch)
    if structural:
        raise ConfigError(f"--resume: the model in {tag_dir!r} differs from this run's config in structure, "
                          f"so its tensors cannot be loaded: " + "; ".join(structural)
                          + "; resume with the stored values, or start a new run (train.init_from for "
                          "weights)")
    check_layout(checkpoint_dir, stored, stored_world, current, world_size)
    changed += input_differences(client, inputs)
    if changed and not allow_config_change:
        raise ConfigError(f"--resume: settings that change the data order, routing or model math differ from "
                          f"those stored in {tag_dir!r}: " + "; ".join(changed)
                          + "; restore them, or pass --allow_config_change to continue with the new values")
    return changed
