"""Checkpoints through the DeepSpeed engine, plus the two things DeepSpeed cannot save for us.

Layout of `<checkpoint_dir>/<tag>/` (its names are `moe_dist/checkpoint/training/layout.py`'s, shared with
the conversion tools):
- DeepSpeed's files: `mp_rank_00_model_states.pt` (dense weights, router buffers, LR scheduler,
  and our client_state: resolved config, tokenizer reference, step, consumed samples) and one
  `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per rank (ZeRO partitions of fp32 master
  weights and Adam state, expert groups partitioned over their EDP group);
- `moe_experts_ep<p>.pt`: the expert state (weights and per-expert buffers) held by EP rank p (written by that EP rank's first
  EDP replica). DeepSpeed saves the module state only from data-parallel rank 0, which holds the
  experts of EP rank 0 only, and its per-expert files need DeepSpeed's own MoE module layout;
- `rank_state_<r>.pt`: each rank's RNG states.

Commit protocol: DeepSpeed's `save_checkpoint` writes `latest` from rank 0 as soon as rank 0's
own files are written (before its final barrier, by truncate-and-write), so a crash of another
rank can leave `latest` naming an incomplete checkpoint. moe_dist calls it with
`save_latest=False`, writes its own files, waits on a barrier, and only then rank 0 points
`latest` at the tag by writing a temporary file and renaming it (atomic on POSIX). `latest`
keeps DeepSpeed's format. The `zero_to_fp32.py` DeepSpeed drops beside the tags cannot merge
moe_dist's expert partitions; it is replaced by one that names `convert_checkpoint.py
consolidate` (recovery_scripts.py).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_dist.checkpoint.files import CheckpointError, deepspeed_loads_weights_only, load_pt, torch_load
from moe_dist.checkpoint.training import digest, disk, retention
from moe_dist.checkpoint.training.finite import check_resumed_finite
from moe_dist.checkpoint.training.layout import (CLIENT_KEY, LATEST, MODEL_STATES, experts_file, rank_state_file,
                                                 read_latest, tag_for_step)
from moe_dist.checkpoint.training.recovery_scripts import replace_recovery_scripts
from moe_dist.checkpoint.training.tags import run_id_problems, write_marker
from moe_dist.common.atomic import fsync_file, write_text_atomic
from moe_dist.moe.experts import GroupedExperts
from moe_dist.parallel import runtime
from moe_dist.parallel.groups import ParallelGroups


def rng_state() -> dict[str, Any]:
    """Tensors and plain values only, so the file loads weights-only: numpy's key array as a tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    # A tensor since issue 26; an ndarray in rank states written before.
    np.random.set_state((kind, np.asarray(keys.numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def expert_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything this rank's expert shards hold: the parameters and persistent buffers of every
    `GroupedExperts` (e.g. a per-expert hidden-unit mask), keyed as in `module.state_dict()`."""
    return {f"{name}.{key}": value.detach().cpu().clone()
            for name, sub in module.named_modules() if isinstance(sub, GroupedExperts)
            for key, value in sub.state_dict().items()}


@dataclass
class Resumed:
    tag: str
    client_state: dict[str, Any]


def _own_files(tag_dir: str, rank: int) -> list[str]:
    """The files of the tag that this rank wrote (DeepSpeed's by its naming, and ours)."""
    mine = re.compile(rf"(^|_)zero_pp_rank_{rank}_|^rank_state_{rank:05d}\.pt$")
    names = [n for n in os.listdir(tag_dir) if mine.search(n)]
    if rank == 0:
        names.append(MODEL_STATES)
    return [os.path.join(tag_dir, n) for n in names if os.path.isfile(os.path.join(tag_dir, n))]


def _commit(checkpoint_dir: str, tag: str, step: int, run_id: str | None) -> None:
    """Rank 0, once every rank's files are written and fsynced: refuse a tag that another run
    wrote into, then the marker, then `latest` (each write atomic and fsynced)."""
    tag_dir = os.path.join(checkpoint_dir, tag)
    problems = run_id_problems(tag_dir, run_id)
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir!r} holds files of another run (this run's id is {run_id!r}); "
                              f"'latest' was not moved: " + "; ".join(problems))
    fsync_file(tag_dir)  # the directory entries of the files
    write_marker(tag_dir, run_id, step, digest.take_rank_digests(tag_dir))
    write_text_atomic(os.path.join(checkpoint_dir, LATEST), tag)
    fsync_file(checkpoint_dir)


def save(engine, checkpoint_dir: str, step: int, client_state: dict[str, Any], groups: ParallelGroups,
         run_id: str | None = None, keep_last: int | None = None) -> str:
    """Write checkpoint `step` on every rank (collective) and commit it; returns its tag. A disk
    too full for it (before or during the save) is a DiskSpaceError on every rank that sees it, a
    folder that cannot be written (read-only, no permission) a NotWritableError, with `latest`
    and the previous checkpoint untouched."""
    tag = tag_for_step(step)
    tag_dir = os.path.join(checkpoint_dir, tag)
    rank = runtime.rank()
    latest = read_latest(checkpoint_dir)
    last_dir = os.path.join(checkpoint_dir, latest) if latest else None
    shortfall = disk.space_shortfall(checkpoint_dir, last_dir) if rank == 0 else None
    if shortfall is not None and retention.deletions_pending():
        # The space the last save's keep_last deletions free may be what this save needs.
        retention.wait_for_deletions(retention.SPACE_WAIT_S, f"checkpoint {tag} needs the space")
        shortfall = disk.space_shortfall(checkpoint_dir, last_dir)
    shortfall = runtime.broadcast_object(shortfall)  # every rank stops at the same place
    if shortfall is not None:
        raise disk.DiskSpaceError(disk.shortfall_message(checkpoint_dir, tag, *shortfall, latest))
    client_state = {**client_state, CLIENT_KEY: {**client_state.get(CLIENT_KEY, {}), "run_id": run_id}}
    try:
        engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
        if rank == 0:
            replace_recovery_scripts(checkpoint_dir)
        written = []
        if rank // groups.ep_size == 0:  # the first EDP replica of each EP rank
            written.append(experts_file(tag_dir, groups.ep_rank))
            torch.save({"ep_size": groups.ep_size, "ep_rank": groups.ep_rank, "run_id": run_id,
                        "experts": expert_state(engine.module)}, written[-1])
        torch.save({"rng": rng_state(), "run_id": run_id, "step": step}, rank_state_file(tag_dir, rank))
        mine = sorted(set(written + _own_files(tag_dir, rank)))
        for path in mine:
            fsync_file(path)
        # Each rank hashes what it wrote, while it is in the page cache, in parallel with the others.
        digest.write_rank_digests(tag_dir, rank, [os.path.basename(path) for path in mine])
    except Exception as e:
        fault = disk.disk_error(e, checkpoint_dir, tag, latest,
                                disk.tree_bytes(last_dir) if last_dir else None, remove=rank == 0)
        if fault is None:
            raise
        raise fault from e
    runtime.barrier()  # every rank's files are on disk before the tag becomes `latest`
    error = None
    if rank == 0:
        try:
            _commit(checkpoint_dir, tag, step, run_id)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            fault = disk.disk_error(e, checkpoint_dir, tag, latest) if not isinstance(e, CheckpointError) else None
            error = (type(fault or e).__name__, str(fault or e))
    error = runtime.broadcast_object(error)
    if error is not None:
        kinds = {"DiskSpaceError": disk.DiskSpaceError, "NotWritableError": disk.NotWritableError}
        raise kinds.get(error[0], CheckpointError)(error[1])
    if rank == 0:  # after the last collective: no rank waits on the filesystem's deletion speed
        retention.apply_keep_last_in_background(checkpoint_dir, keep_last, just_written=tag, run_id=run_id)
    return tag


def _read_own_files(tag_dir: str, groups: ParallelGroups) -> tuple[dict[str, Any] | None, str | None]:
    """(this EP rank's expert file, None), or (None, why not), with every other file this rank's
    load reads (DeepSpeed's model states, its ZeRO partition, its rank state) read weights-only
    first, memory-mapped: a file that pickles code, or is not a checkpoint, is found before
    DeepSpeed reads any."""
    experts_path = experts_file(tag_dir, groups.ep_rank)
    try:
        for path in sorted({os.path.join(tag_dir, MODEL_STATES), *_own_files(tag_dir, runtime.rank())}):
            try:
                torch_load(path, deepspeed=True, mmap=True)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged file, whatever torch raises for it
                raise CheckpointError(f"cannot read {path!r} ({type(e).__name__}: {e})") from None
        saved = load_pt(experts_path, f"expert (EP rank {groups.ep_rank})")
    except CheckpointError as e:
        return None, str(e)
    if saved["ep_size"] != groups.ep_size:
        return None, (f"{experts_path!r} was written with ep_size {saved['ep_size']}, this run has ep_size "
                      f"{groups.ep_size}; reshard the checkpoint (tools/convert_checkpoint.py reshard) to resume it "
                      f"at this ep_size")
    return saved, None


def load_latest(engine, checkpoint_dir: str, groups: ParallelGroups) -> Resumed:
    """Load the latest complete checkpoint into the engine (weights, ZeRO optimizer state, LR
    scheduler), this EP rank's experts and this rank's RNG; returns the client state. A checkpoint
    that cannot be resumed is a CheckpointError (preflight's resume checks catch these earlier)."""
    tag = read_latest(checkpoint_dir)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint in {checkpoint_dir!r}: expected a {LATEST!r} file "
                              f"naming the last committed tag")
    tag_dir = os.path.join(checkpoint_dir, tag)
    saved, error = _read_own_files(tag_dir, groups)
    # One rank's bad file stops every rank here, together, before DeepSpeed's collectives.
    if runtime.all_reduce_max(torch.full((1,), float(error is not None), dtype=torch.float64)).tolist()[0]:
        raise CheckpointError(error or f"--resume: another rank cannot load its files of {tag_dir!r} (see its "
                                       f"message); nothing was loaded")

    def load_module(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
        # The module file holds EP rank 0's experts; this rank's come from its own file. Both files
        # carry one run's names; a checkpoint from before the rename is migrated by the model's
        # load_state_dict pre-hook (moe_dist.moe.legacy_names), as every load is.
        merged = dict(src)
        merged.update(saved["experts"])
        dst.load_state_dict(merged, strict=True)

    with deepspeed_loads_weights_only(engine):  # DeepSpeed's own torch.load calls: no code runs either
        load_path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag, custom_load_fn=load_module)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir!r} (its load_checkpoint "
                              f"returned no path): expected DeepSpeed's model and optimizer states there")
    rank_path = rank_state_file(tag_dir, runtime.rank())
    if os.path.isfile(rank_path):
        set_rng_state(load_pt(rank_path, f"rank state (rank {runtime.rank()})")["rng"])
    check_resumed_finite(engine.module, engine.optimizer, tag_dir)
    return Resumed(tag=tag, client_state=client_state)
