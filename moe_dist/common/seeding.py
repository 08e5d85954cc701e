"""Generators keyed by (seed, *keys), so weights drawn from them do not depend on the parallel
layout: expert i of layer l is drawn from `init_generator(seed, l, i)` on whichever rank holds it,
which is what makes an EP=N run comparable with one process."""

from __future__ import annotations

import torch


def init_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, *keys): parameters drawn from it are identical on
    every rank and for every parallel layout."""
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k + 1) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(value)
