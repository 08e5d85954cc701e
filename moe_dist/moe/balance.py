"""What the scoped balance losses read besides the router's output: the sequences of the
`sequence` scope and the running step counts of the `global_batch` scope (docs/training.md,
"Balance-loss scopes"). Pure functions of tensors; no host read.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_dist.routing.losses import Segments

# The counts the global_batch scope keeps a running sum of, over an optimizer step's micro batches.
STEP_COUNTS = ("tokens_per_expert", "importance")


def sequence_segments(input_shape: torch.Size, segment_ids_T: Tensor | None, device) -> Segments:
    """Each token's sequence: its row of a [B, S, D] input, or with `segment_ids_T` (documents
    numbered from 0 within each row) its (row, document) pair. A [T, D] input is one row."""
    if len(input_shape) not in (2, 3):
        raise ValueError(f"the sequence balance scope needs the layer's input as [B, S, D] or [T, D], "
                         f"got shape {tuple(input_shape)}")
    T = math.prod(input_shape[:-1])
    S = input_shape[-2] if len(input_shape) == 3 else T
    B = T // S
    if segment_ids_T is None:
        if len(input_shape) == 2:
            raise ValueError("the sequence balance scope needs a [B, S, D] input or "
                             "MoESideInputs.segment_ids_T; got a [T, D] input without segment ids")
        return Segments(torch.arange(T, device=device) // S, B)
    segment_ids_T = segment_ids_T.reshape(-1)
    if segment_ids_T.numel() != T:
        raise ValueError(f"segment_ids_T has {segment_ids_T.numel()} entries for {T} tokens")
    row_T = torch.arange(T, device=device) // S
    return Segments(row_T * S + segment_ids_T.to(device=device, dtype=torch.long), B * S)


def nonempty_segments(segments: Segments, valid_T: Tensor | None) -> Tensor:
    """float32 []: segments holding at least one real token (summable over ranks)."""
    key_T = segments.key_T
    w_T = torch.ones(key_T.shape[0]) if valid_T is None else valid_T.reshape(-1).float()
    w_T = w_T.to(key_T.device)
    tokens_O = torch.zeros(segments.count, device=key_T.device).scatter_add_(0, key_T, w_T)
    return (tokens_O > 0).float().sum()


def with_step_prior(counts: dict[str, Tensor],
                    prior: dict[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The loss counts with the step's earlier micro batches' counts added as `step_prior_<key>`
    (zeros at the step's first micro batch), and the running counts to hand to the next micro
    batch: prior + this micro batch's counts (global where the loss is weighted)."""
    prior = prior or {}
    out, running = dict(counts), {}
    for key in STEP_COUNTS:
        if key not in counts:
            continue
        before = prior.get(key)
        before = torch.zeros_like(counts[key]) if before is None else before.to(counts[key])
        out[f"step_prior_{key}"] = before
        running[key] = before + counts[key].detach()
    return out, running
