"""`census_of_backward`: the host-sync census over a backward, custom autograd functions included."""

from __future__ import annotations

import contextlib

from torch.autograd.function import BackwardCFunction

from moe_dist.common.host_sync import HostSyncCensus


@contextlib.contextmanager
def census_of_backward(census: HostSyncCensus):
    """`census` over a backward, custom autograd functions' backward code included: the autograd
    engine runs those without the caller's torch function modes, so each gets the census
    pushed again around its call."""
    real = BackwardCFunction.apply

    def apply(self, *args):
        with census:
            return real(self, *args)

    BackwardCFunction.apply = apply
    try:
        with census:
            yield census
    finally:
        BackwardCFunction.apply = real
