"""`census_of_backward`: the host-sync census over a backward, custom autograd functions included;
`census_of_layer_step`: the census of one MoE layer's forward and backward."""

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


def census_of_layer_step(layer, x, side=None):
    """`(out, forward census, backward census)` of one step of `layer` on `x`: the forward, a loss
    of its output and aux loss (routers without probabilities weigh none), and the backward."""
    forward, backward = HostSyncCensus(), HostSyncCensus()
    with forward:
        out = layer(x, side)
        loss = out.y.float().square().sum()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
    with census_of_backward(backward):
        loss.backward()
    return out, forward, backward
