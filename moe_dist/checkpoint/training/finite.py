"""A resumed checkpoint must be finite: a NaN in it otherwise trains on as `loss nan` and commits
more NaN checkpoints. Checked where its tensors are already in memory: after DeepSpeed's load
(writer.load_latest), over the module's weights and buffers and the ZeRO fp32 master partitions
(where bf16 training keeps what the optimizer steps on), with one all-reduced count so every rank
stops together even when only one rank's experts are bad.
"""

from __future__ import annotations

import torch

from moe_dist.checkpoint.files import is_non_finite, name_some
from moe_dist.checkpoint.training.layout import ENGINE_PREFIX
from moe_dist.common.config import ConfigError
from moe_dist.parallel import runtime


def loaded_non_finite(model: torch.nn.Module, optimizer) -> list[str]:
    """Names (without the engine wrapper's prefix) of this rank's non-finite module tensors and ZeRO
    fp32 master partitions."""
    bad = [name.removeprefix(ENGINE_PREFIX) for name, t in model.state_dict().items() if is_non_finite(t)]
    for i, part in enumerate(getattr(optimizer, "single_partition_of_fp32_groups", None) or []):
        if is_non_finite(part):
            bad.append(f"ZeRO fp32 master partition of param group {i} (rank {runtime.rank()})")
    return bad


def check_resumed_finite(model: torch.nn.Module, optimizer, tag_dir: str) -> None:
    """Collective: ConfigError on every rank when any rank loaded a non-finite tensor."""
    bad = loaded_non_finite(model, optimizer)
    # A fill, not a tensor from host data; the seam reduces it on the device the group serves.
    total = int(runtime.all_reduce_max(torch.full((1,), float(len(bad)), dtype=torch.float64)).tolist()[0])
    if total:
        here = (f"rank {runtime.rank()}: {name_some(bad)}" if bad
                else "another rank's tensors (see its message)")
        raise ConfigError(f"--resume: checkpoint {tag_dir!r} holds non-finite tensors ({here}); resume from "
                          f"an earlier tag (write its name into 'latest')")
