"""Weights a run starts from must be finite: a NaN in `train.init_from` or in a resumed
checkpoint otherwise trains on as `loss nan` and commits more NaN checkpoints.

`init_from` is checked in preflight, one tensor at a time from the consolidated file (safetensors
are read lazily), before any process group exists. A resumed checkpoint is checked where its
tensors are already in memory: after DeepSpeed's load, over the module's weights and buffers
and the ZeRO fp32 master partitions (where bf16 training keeps what the optimizer steps on),
with one all-reduced count so every rank stops together even when only one rank's experts are
bad.
"""

from __future__ import annotations

import torch

from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint, _WeightsReader
from moe_dist.common.config import ConfigError
from moe_dist.parallel import runtime

MAX_NAMED = 8  # tensors named in one message; the count says how many more


def _is_bad(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def _describe(bad: list[str]) -> str:
    more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    return ", ".join(bad[:MAX_NAMED]) + more


def check_init_from_finite(path: str) -> None:
    """Every floating tensor of the consolidated checkpoint `path` is finite, else ConfigError
    naming the tensors and the file."""
    ckpt = ConsolidatedCheckpoint.open(path)
    bad = []
    with _WeightsReader(ckpt.weights_path) as reader:
        for name in reader.names():
            t = reader.tensor(name)
            if _is_bad(t):
                bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values non-finite)")
    if bad:
        raise ConfigError(f"train.init_from: {ckpt.weights_path!r} holds non-finite tensors: {_describe(bad)}; "
                          f"start from a finite checkpoint (an earlier tag, consolidated again)")


def loaded_non_finite(model: torch.nn.Module, optimizer) -> list[str]:
    """Names of this rank's non-finite module tensors and ZeRO fp32 master partitions."""
    bad = [name for name, t in model.state_dict().items() if _is_bad(t)]
    for i, part in enumerate(getattr(optimizer, "single_partition_of_fp32_groups", None) or []):
        if _is_bad(part):
            bad.append(f"ZeRO fp32 master partition of param group {i} (rank {runtime.rank()})")
    return bad


def check_resumed_finite(model: torch.nn.Module, optimizer, tag_dir: str) -> None:
    """Collective: ConfigError on every rank when any rank loaded a non-finite tensor."""
    bad = loaded_non_finite(model, optimizer)
    total = int(runtime.all_reduce_max(torch.tensor([len(bad)], dtype=torch.float64))[0])
    if total:
        here = (f"rank {runtime.rank()}: {_describe(bad)}" if bad
                else "another rank's tensors (see its message)")
        raise ConfigError(f"--resume: checkpoint {tag_dir!r} holds non-finite tensors ({here}); resume from "
                          f"an earlier tag (write its name into 'latest')")
