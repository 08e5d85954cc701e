"""Run a function on N CPU processes joined by a gloo process group (for equivalence tests)."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world_size: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share 2 cores: oversubscription only adds noise
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except Exception:
        traceback.print_exc()  # spawn re-raises without the worker's traceback on some versions
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo processes; re-raise any failure.
    `fn` must be a module-level function (it is pickled by reference)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=True)


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's contiguous slice along dim 0 (the global batch is split the same way)."""
    n = t.shape[0] // world_size
    return t[rank * n:(rank + 1) * n]


def assert_grads_and_adamw_step_match(model, ref, ref_slice, what: str, **tol) -> None:
    """Every gradient of this rank's `model` equals the reference's (`ref_slice(name, t)`: the
    reference's counterpart, e.g. this rank's experts), and so does every parameter after one
    AdamW step of each. eps well above fp32 noise: Adam's g/sqrt(v) turns 1e-9 noise in a ~0
    gradient into a full lr-sized step, which would test rounding, not the optimizer state's layout."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_slice(name, ref_params[name].grad), **tol,
                                   msg=lambda m: f"grad of {name} {what}: {m}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-4)
    opt.step()
    opt_ref.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_slice(name, ref_params[name]), **tol,
                                   msg=lambda m: f"param {name} after AdamW {what}: {m}")
