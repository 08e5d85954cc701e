"""`inhibition`: the neural-inhibition router, docs/routers/inhibition.md. This is this project's
formulation of the idea of Zou & Zhang (arXiv 2507.03221), not the paper's exact algorithm.

Legend: moe_dist/moe/__init__.py (Z: the shared directions removed in subspace mode; D is here the
router input's width).

Remove from the router's input what the token population shares, then route exactly like `topk`
on the result. It has to act across tokens: a per-token shift of the logits changes nothing in a
softmax/top-k, and the pre-norm centres each token over its own features, not the population.

Population statistics are global over the data-parallel group (sums of local sums and counts, so
routing does not depend on how tokens are sharded), detached, and folded in training into EMA
buffers with bias correction. Training routes with the batch statistic or the EMA (`stat`); eval
always uses the EMA, so inference is per-token deterministic. The EMA buffers are persistent
(checkpointed) and are the only state the router updates, and only in a training forward: a
forward re-run by activation checkpointing folds its batch in twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_dist.common.config import ConfigError, check, check_choice
from moe_dist.routing.base import RouterOutput, RoutingContext
from moe_dist.routing.fp32_buffers import FP32Buffers
from moe_dist.routing.topk import TopKRouter, TopKRouterConfig

INHIBITION_MODES = ("subtractive", "divisive", "rectified", "subspace")
STATISTICS = ("batch", "ema")


@dataclass
class InhibitionConfig(TopKRouterConfig):
    type: str = "inhibition"
    mode: str = "subtractive"
    stat: str = "ema"  # statistic used in training; eval always uses the EMA
    momentum: float = 0.99  # EMA: mu <- m * mu + (1 - m) * batch statistic
    alpha: float = 1.0  # inhibition strength of subtractive and rectified modes
    eps: float = 1e-5  # divisive mode: u = (x - mu) / sqrt(var + eps)
    rank: int = 1  # subspace mode: shared directions removed
    refresh_every: int = 100  # subspace mode: training steps between refreshes of the EMA directions

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("router.mode", self.mode, INHIBITION_MODES)
        check_choice("router.stat", self.stat, STATISTICS)
        check(0.0 <= self.momentum < 1.0, f"router.momentum must be in [0, 1), got {self.momentum!r}")
        check(self.alpha >= 0, f"router.alpha must be >= 0, got {self.alpha!r}")
        check(self.eps > 0, f"router.eps must be > 0, got {self.eps!r}")
        check(isinstance(self.rank, int) and self.rank >= 1, f"router.rank must be an integer >= 1, got {self.rank!r}")
        check(isinstance(self.refresh_every, int) and self.refresh_every >= 1,
              f"router.refresh_every must be an integer >= 1, got {self.refresh_every!r}")


def population_statistics(x_TD: Tensor, ctx: RoutingContext, mode: str) -> dict[str, Tensor]:
    """Means over the real tokens of every data-parallel rank, from one all-reduce of local sums:
    `mean_D` always, `var_D` (per feature) for divisive, `second_DD` (E[x x^T]) for subspace.
    Padding (`ctx.valid_T` False) is in no sum and no count."""
    x = x_TD.detach().float()
    if ctx.valid_T is None:
        count, xw = torch.full((1,), float(x.shape[0]), device=x.device), x
    else:
        w_T = ctx.valid_T.reshape(-1).to(x.dtype)
        count, xw = w_T.sum().reshape(1), x * w_T[:, None]
    parts = [count, xw.sum(0)]
    if mode == "divisive":
        parts.append((xw * x).sum(0))
    elif mode == "subspace":
        parts.append((xw.t() @ x).flatten())
    packed = ctx.all_reduce_sum(torch.cat(parts))
    D = x.shape[1]
    count, sums = packed[0].clamp_min(1.0), packed[1:]
    stats = {"mean_D": sums[:D] / count}
    if mode == "divisive":
        stats["var_D"] = (sums[D:] / count - stats["mean_D"].square()).clamp_min(0.0)
    elif mode == "subspace":
        stats["second_DD"] = sums[D:].view(D, D) / count
    return stats


def top_directions(second_DD: Tensor, rank: int) -> Tensor:
    """`U_DZ`: orthonormal eigenvectors of the `rank` largest eigenvalues.

    The matrix is the uncentred second moment E[x x^T], not the covariance about the mean: a
    component every token shares is the population mean, which the centred covariance cannot
    see. This choice is this project's reading of "shared directions". Each column's sign is
    fixed (largest entry positive) so that the buffer does not flip between runs or ranks whose
    statistics differ in the last bits.
    """
    U_DZ = torch.linalg.eigh(second_DD).eigenvectors[:, -rank:]
    pivot_Z = U_DZ.gather(0, U_DZ.abs().argmax(0, keepdim=True))
    return U_DZ * torch.sign(pivot_Z)


def inhibit(x_TD: Tensor, mode: str, stats: dict[str, Tensor], alpha: float, eps: float) -> Tensor:
    """`u` from `x` and the population statistics (docs/routers/inhibition.md, "Math" 4), in fp32."""
    x = x_TD.float()
    if mode == "subtractive":
        return x - alpha * stats["mean_D"]
    if mode == "rectified":
        return F.relu(x - alpha * stats["mean_D"])
    if mode == "divisive":
        return (x - stats["mean_D"]) * torch.rsqrt(stats["var_D"] + eps)
    U_DZ = stats["basis_DZ"]
    return x - (x @ U_DZ) @ U_DZ.t()


class PopulationInhibition(FP32Buffers):
    """`x_TD -> u_TD` with global batch statistics in training and their bias-corrected EMAs.

    Also used by `fixed_projection` (`center: true`).
    """

    def __init__(self, width: int, *, mode: str = "subtractive", stat: str = "ema", momentum: float = 0.99,
                 alpha: float = 1.0, eps: float = 1e-5, rank: int = 1, refresh_every: int = 100) -> None:
        super().__init__()
        if mode == "subspace" and not rank < width:
            raise ConfigError(f"inhibition rank ({rank}, router.rank) must be < the router input width ({width})")
        self.mode, self.stat, self.momentum = mode, stat, momentum
        self.alpha, self.eps, self.rank, self.refresh_every = alpha, eps, rank, refresh_every
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=True)
        # `num_updates` as the host knows it: the subspace refresh is decided without reading the
        # device in the forward. Kept equal to the buffer by `_fold` and by every state-dict load.
        self._host_updates = 0
        # EMAs of the batch statistics (zero-initialised, hence the bias correction).
        shapes = self._ema_shapes(width)
        self.ema_names = tuple(shapes)
        for name, shape in shapes.items():
            self.register_buffer(f"ema_{name}", torch.zeros(shape), persistent=True)
        if mode == "subspace":
            self.register_buffer("basis_DZ", torch.zeros(width, rank), persistent=True)

    def _ema_shapes(self, width: int) -> dict[str, tuple[int, ...]]:
        if self.mode == "subspace":
            return {"second_DD": (width, width)}
        if self.mode == "divisive":
            return {"mean_D": (width,), "var_D": (width,)}
        return {"mean_D": (width,)}

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        return inhibit(x_TD, self.mode, self._statistics(x_TD, ctx), self.alpha, self.eps)

    @property
    def trains_under_compile(self) -> bool:
        """False where AOTAutograd may save the buffers `_fold` mutates as the backward's inputs
        and read them after the mutation: the gradient through the EMA's scale comes out wrong,
        silently (seen with torch 2.13). Subspace also counts its refreshes on the host."""
        return not (self.mode == "subspace" or (self.mode == "divisive" and self.stat == "ema"))

    def compile_refusal(self) -> str:
        return (f"router.mode {self.mode!r} with router.stat {self.stat!r} cannot be trained under "
                f"torch.compile: run the layer eager (train.compile: false), or use mode subtractive/rectified, "
                f"or divisive with stat 'batch'")

    def _statistics(self, x_TD: Tensor, ctx: RoutingContext) -> dict[str, Tensor]:
        if not ctx.training:
            return self.ema_statistics()
        if torch.compiler.is_compiling() and not self.trains_under_compile:
            raise ConfigError(self.compile_refusal())
        batch = population_statistics(x_TD, ctx, self.mode)
        self._fold(batch)
        if self.mode == "subspace":
            if self.stat == "batch":
                return {"basis_DZ": top_directions(batch["second_DD"], self.rank)}
            return self.ema_statistics()
        return batch if self.stat == "batch" else self.ema_statistics()

    @torch.no_grad()
    def _fold(self, batch: dict[str, Tensor]) -> None:
        self.num_updates += 1
        for name in self.ema_names:
            getattr(self, f"ema_{name}").lerp_(batch[name], 1.0 - self.momentum)
        if self.mode != "subspace":
            return
        # The step count is the host's mirror, not the buffer: no read of the device per forward
        # (the refresh's eigendecomposition itself is one, every `refresh_every` steps). Other
        # modes never touch it, so a compiled forward does not specialise on a changing int.
        self._host_updates += 1
        if (self._host_updates - 1) % self.refresh_every == 0:
            self.basis_DZ.copy_(top_directions(self._corrected("second_DD", 0.0), self.rank))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_updates = int(self.num_updates)  # a load, not a forward: the one read is free

    def _corrected(self, name: str, default: float) -> Tensor:
        """Bias-corrected EMA `ema / (1 - m^t)`; `default` (no inhibition) before any update."""
        t = self.num_updates
        correction = 1.0 - self.momentum ** t.float()
        value = getattr(self, f"ema_{name}") / correction.clamp_min(1e-12)
        return torch.where(t > 0, value, torch.full_like(value, default))

    def ema_statistics(self) -> dict[str, Tensor]:
        if self.mode == "subspace":
            # A copy: autograd keeps U for the backward, and a later forward refreshes the buffer
            # in place (two forwards before one backward would otherwise fail).
            return {"basis_DZ": self.basis_DZ.clone()}
        stats = {"mean_D": self._corrected("mean_D", 0.0)}
        if self.mode == "divisive":
            stats["var_D"] = self._corrected("var_D", 1.0)
        return stats


class InhibitionRouter(TopKRouter):
    """`topk` (same gate, weights and aux losses) on the inhibited input."""

    def __init__(self, cfg: InhibitionConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        self.inhibition = PopulationInhibition(
            self.d_model, mode=cfg.mode, stat=cfg.stat, momentum=cfg.momentum, alpha=cfg.alpha, eps=cfg.eps,
            rank=cfg.rank, refresh_every=cfg.refresh_every)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        return super().forward(self.inhibition(x_TD, ctx), ctx)
