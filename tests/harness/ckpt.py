"""Real training checkpoints for the checkpoint-tool tests: tiny runs through the trainer's own
API on 2 gloo processes (harness.train), recording what training saw (per-step losses, the
trained model's eval logits on a fixed batch) so conversions can be checked against it.

The model is Mixtral-shaped on purpose (every layer MoE, SwiGLU, renormalized top-2 softmax,
eval capacity that drops nothing), so the same checkpoint also serves the Hugging Face export.

Runs (all in one spawn, so the process start-up, which dominates, is paid once):
  a: ep_size 2, ZeRO-1, fp32, 2N steps, checkpoints at N and 2N
  b: a@N resharded to ep_size 1, resumed to 2N
  c: ep_size 1, ZeRO-2, fp32, 2N steps (expert group partitioned over 2 EDP ranks)
  d: c@N resharded to ep_size 2, resumed to 2N
  e: ep_size 2, ZeRO-2, bf16, N steps (fp32 master weights differ from the module's)
and the consolidated a@2N loaded back into ep_size 2 and ep_size 1 models on both ranks.
"""

from __future__ import annotations

import json
import os

import torch
from tests.harness.train import REPO, dump_json, tiny_config

from moe_dist.checkpoint import consolidate, load_consolidated, reshard
from moe_dist.checkpoint.training.layout import tag_for_step
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel import runtime
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import parse_run_config
from moe_dist.train.preflight import preflight
from moe_dist.train.trainer import Trainer, pretrain

N = 2  # steps before the checkpoint that is resharded; runs go to 2N
VOCAB, SEQ = 257, 16


def run_config(ep_size: int, checkpoint_dir: str, *, deepspeed_config: str | None = None, steps: int = 2 * N,
               micro_batch: int = 2, dropless: bool = False):
    """`dropless`: capacity is per rank, so only without drops do runs at different world sizes
    route the same tokens the same way."""
    return parse_run_config(tiny_config(
        model=dict(moe_every=1, moe_offset=0, max_seq_len=SEQ),
        moe=dict(ep_size=ep_size, eval_capacity_factor=0.0, dropless=dropless,
                 router={"type": "topk", "renormalize": True}),
        train=dict(deepspeed_config=deepspeed_config or os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"),
                   steps=steps, seq_len=SEQ, micro_batch=micro_batch, grad_accum=1, checkpoint_interval=N,
                   checkpoint_dir=checkpoint_dir)))


def fixed_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(fixed_tokens()).logits_BSV


def train_and_record(cfg, tmp: str, name: str) -> None:
    trainer = Trainer(cfg, preflight(cfg, runtime.world_size(), cfg.train.deepspeed_config))
    result = trainer.run()
    logits = eval_logits(trainer.model)  # collective at ep_size > 1: every rank runs it
    if runtime.rank() == 0:
        torch.save(logits, os.path.join(tmp, f"{name}_logits.pt"))
        dump_json(os.path.join(tmp, f"{name}.json"), result.losses)


def resume_and_record(ckpt: str, tmp: str, name: str, ep_size: int, **cfg_kw) -> None:
    result = pretrain(run_config(ep_size, ckpt, **cfg_kw), resume=True)
    if runtime.rank() == 0:
        dump_json(os.path.join(tmp, f"{name}.json"), result.losses)


def _reshard_and_resume(src: str, tmp: str, name: str, ep_size: int, **cfg_kw) -> None:
    out = os.path.join(tmp, f"{name}_ckpt")
    if runtime.rank() == 0:
        reshard(src, out, ep_size=ep_size, tag=tag_for_step(N), progress=False)
    runtime.barrier()
    resume_and_record(out, tmp, name, ep_size, **cfg_kw)


def _load_consolidated_at(ep_size: int, tmp: str) -> None:
    cfg = run_config(ep_size, "-")
    model = MoETransformer(cfg.model, seed=cfg.train.seed, groups=ParallelGroups.from_deepspeed(ep_size, 4))
    load_consolidated(model, os.path.join(tmp, "a_consolidated"))
    logits = eval_logits(model)
    if runtime.rank() == 0:
        torch.save(logits, os.path.join(tmp, f"loaded_ep{ep_size}_logits.pt"))


def _init_from_consolidated(tmp: str) -> None:
    """A fresh run at another EP size (1, i.e. 2 expert-data-parallel replicas) starting from
    the consolidated a@2N: its model holds the trained weights before the first step."""
    cfg = run_config(1, os.path.join(tmp, "f"))
    cfg.train.init_from = os.path.join(tmp, "a_consolidated")
    trainer = Trainer(cfg, preflight(cfg, runtime.world_size(), cfg.train.deepspeed_config))
    logits = eval_logits(trainer.model)
    if runtime.rank() == 0:
        torch.save(logits, os.path.join(tmp, "init_from_logits.pt"))


def training_worker(rank: int, world: int, tmp: str) -> None:
    a, c = os.path.join(tmp, "a"), os.path.join(tmp, "c")
    train_and_record(run_config(2, a), tmp, "a")
    if rank == 0:
        consolidate(a, os.path.join(tmp, "a_consolidated"), progress=False)
    runtime.barrier()
    _load_consolidated_at(2, tmp)
    _load_consolidated_at(1, tmp)
    _init_from_consolidated(tmp)
    _reshard_and_resume(a, tmp, "b", ep_size=1)
    zero2 = os.path.join(REPO, "configs/deepspeed/zero2_cpu.json")
    train_and_record(run_config(1, c, deepspeed_config=zero2), tmp, "c")
    _reshard_and_resume(c, tmp, "d", ep_size=2, deepspeed_config=zero2)
    bf16 = os.path.join(tmp, "zero2_bf16.json")
    if rank == 0:
        dump_json(bf16, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
                         "steps_per_print": 10**9})
    runtime.barrier()
    train_and_record(run_config(2, os.path.join(tmp, "e"), deepspeed_config=bf16, steps=N), tmp, "e")


def read_losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {int(k): v for k, v in json.load(f).items()}
