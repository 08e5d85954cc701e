"""Names and places in a moe_dist training checkpoint (the trainer writes them:
moe_dist/checkpoint/training/writer.py), and how a path given on the command line resolves to one tag.

    <checkpoint_dir>/latest                              tag of the last complete checkpoint
    <checkpoint_dir>/<tag>/mp_rank_00_model_states.pt    DeepSpeed: dense weights, buffers, EP rank
                                                         0's experts, LR scheduler, client_state
    <checkpoint_dir>/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO partitions
    <checkpoint_dir>/<tag>/moe_experts_ep<p:03d>.pt      EP rank p's experts (stacked [e, ...])
    <checkpoint_dir>/<tag>/rank_state_<r:05d>.pt         rank r's RNG states

Parameter names inside the DeepSpeed files carry the engine wrapper's prefix (`model.`); the
consolidated format uses the bare `MoETransformer` names.
"""

from __future__ import annotations

import os
import re

from moe_dist.checkpoint.files import CheckpointError

LATEST = "latest"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(checkpoint_dir: str) -> str | None:
    """The tag of the last completely written checkpoint, or None."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        # A damaged or foreign file: one plain error (exit 2 at start-up), not a traceback.
        raise CheckpointError(f"{path!r} is not a tag name: {len(raw)} bytes that are not UTF-8 text ({e.reason} "
                              f"at byte {e.start}); expected the name of the last committed tag, e.g. "
                              f"'step_00000100' (write the newest complete tag's name into it)") from None
    return tag or None


def experts_file(tag_dir: str, ep_rank: int) -> str:
    return os.path.join(tag_dir, f"moe_experts_ep{ep_rank:03d}.pt")


def rank_state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rank_state_{rank:05d}.pt")


MODEL_STATES = "mp_rank_00_model_states.pt"
# `EngineModule.model`: the prefix of every model tensor in DeepSpeed's files.
ENGINE_PREFIX = "model."
CLIENT_KEY = "moe_dist"  # the trainer's entry in DeepSpeed's client_state

# A stacked expert tensor of an MoE layer in the bare model's state dict (`GroupedExperts`).
_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.moe\.experts\.[^.]+$")


def zero_file(tag_dir: str, dp_rank: int, bf16: bool) -> str:
    prefix = "bf16_" if bf16 else ""
    return os.path.join(tag_dir, f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt")


def is_expert_key(name: str) -> bool:
    """True for the stacked [E, ...] expert tensors of the bare model's state dict."""
    return _EXPERT_KEY.match(name) is not None


def strip_engine_prefix(name: str, where: str) -> str:
    if not name.startswith(ENGINE_PREFIX):
        raise CheckpointError(f"{where}: tensor {name!r} does not start with {ENGINE_PREFIX!r}; "
                              f"expected a checkpoint written by moe_dist's trainer")
    return name[len(ENGINE_PREFIX):]


def resolve_tag_dir(path: str, tag: str | None = None) -> str:
    """The tag directory for `path`: a checkpoint directory (its `latest`, or `tag`) or a tag
    directory itself. Raises CheckpointError naming what is missing."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if tag is not None:
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"checkpoint {path!r} has no tag {tag!r} (no directory {tag_dir!r})")
        return tag_dir
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return path
    latest = read_latest(path)
    if latest is None:
        raise CheckpointError(f"{path!r} is neither a checkpoint tag directory (no {MODEL_STATES}) nor a "
                              f"checkpoint directory with a {LATEST!r} file; pass a tag with --tag")
    tag_dir = os.path.join(path, latest)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{os.path.join(path, LATEST)!r} names tag {latest!r}, but {tag_dir!r} does "
                              f"not exist")
    return tag_dir
