"""The pretraining loop: preflight checks, DeepSpeed engine, data, steps, evaluation, logging,
checkpoints. Run by launch/pretrain.py under the `deepspeed` launcher (one process per rank).

Order matters: every check that can fail (train/preflight/) runs before the process group, the
model or any dataset index exists.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from moe_dist.checkpoint import training as checkpoint
from moe_dist.checkpoint.consolidated import load_consolidated
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.common import process
from moe_dist.data.loader import build_dataloader
from moe_dist.data.pipeline import build_datasets
from moe_dist.evaluate.precision import sequence_loss_sums, standard_error
from moe_dist.model.compile import compile_blocks
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel import runtime
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import RunConfig
from moe_dist.train.engine import build_engine
from moe_dist.train.moe_metrics import MoEStatsAccumulator, step_load, wants_step_load
from moe_dist.train.preflight import Preflight, preflight, requested_samples
from moe_dist.train.progress import Progress, format_duration
from moe_dist.train.safety.exits import PREEMPTED, RunStopped
from moe_dist.train.safety.guard import RunSafety
from moe_dist.train.schedule import ConfiguredSettings, resume_lr_change, schedule_changes
from moe_dist.train.tb_logger import TensorBoardLogger, perplexity


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> mean LM loss
    val_losses: dict[int, float] = field(default_factory=dict)


def log0(message: str) -> None:
    if runtime.rank() == 0:
        print(message, flush=True)


class Trainer:
    def __init__(self, cfg: RunConfig, checks: Preflight, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.checks = checks
        self.config_path = config_path
        train = cfg.train
        process.set_cpu_threads(cfg.cpu.threads, runtime.env_local_size())
        if note := process.keep_freed_memory(cfg.cpu.keep_freed_memory):
            log0(note)
        runtime.init_distributed(train.collective_timeout)
        self.rank, self.world = runtime.rank(), runtime.world_size()
        # Rank 0's run id on every rank; DeepSpeed stores its config in each of its files.
        self.run_id = runtime.broadcast_object(checks.run.run_id if checks.run else None)
        checks.ds_config = {**checks.ds_config, checkpoint.RUN_ID_KEY: self.run_id}
        moe = cfg.model.moe
        with runtime.groups_created_with_timeout(train.collective_timeout):  # DeepSpeed's groups too
            self.groups = (ParallelGroups.from_deepspeed(moe.ep_size, moe.num_experts) if moe is not None
                           else ParallelGroups(world_size=self.world, rank=self.rank, ep_size=1))
        # Per-rank RNG streams (router jitter and the like); model weights use their own seeds.
        torch.manual_seed(train.seed * 100_003 + self.rank)
        self.model = MoETransformer(cfg.model, seed=train.seed, groups=self.groups)
        if train.init_from:
            # Before the engine exists: ZeRO's fp32 master copies are taken from these weights.
            load_consolidated(self.model, train.init_from)
            log0(f"initialized from consolidated checkpoint {train.init_from}")
        if train.compile:
            compile_blocks(self.model, self.groups)
            log0("train.compile: blocks compile in the first steps (and again for evaluation's shapes)")
        with runtime.groups_created_with_timeout(train.collective_timeout):
            self.engine, self.optimizer, self.scheduler = build_engine(self.model, train, checks.ds_config)
        self.device = self.engine.device
        self.global_batch = checks.ds_config["train_batch_size"]
        self.datasets = build_datasets(
            cfg.data, cfg.model.vocab_size, *requested_samples(train, self.global_batch, self.world))
        self.tokenizer = self.datasets.tokenizer
        self.step = 0
        self.tb = TensorBoardLogger(train.tensorboard_dir, enabled=self.rank == 0)
        self.safety = RunSafety(train, [i for i, _ in self.model.moe_layers()], device=self.device)
        routers = {layer: moe.router for layer, moe in self.model.moe_layers()}
        # Only routers with an after_step hook (aux-loss-free bias balancing) cost a per-step all-reduce.
        self.after_step_routers = routers if wants_step_load(routers.values()) else {}

    # ---- checkpoints -------------------------------------------------------------------------

    def client_state(self) -> dict:
        tok = self.cfg.data.tokenizer
        return {"moe_dist": {
            "step": self.step,
            "consumed_samples": self.step * self.global_batch,
            "config": self.cfg.to_dict(),
            "config_path": self.config_path,
            "tokenizer": {"kind": tok.kind, "model": tok.model,
                          "unique_identifiers": dict(self.tokenizer.unique_identifiers),
                          "vocab_size": self.tokenizer.vocab_size},
            "world_size": self.world,
            "skipped_steps": self.safety.skipped,
            # What --resume compares the data with (moe_dist/train/preflight/data.py, input_identity).
            "data_identity": (self.checks.inputs or {}).get("data"),
        }}

    def save(self) -> str:
        t0 = time.perf_counter()
        self.safety.before_save(self.engine.module, self.step)
        tag = checkpoint.save(self.engine, self.cfg.train.checkpoint_dir, self.step, self.client_state(),
                              self.groups, run_id=self.run_id, keep_last=self.cfg.train.keep_last)
        log0(f"saved checkpoint {tag} in {time.perf_counter() - t0:.1f}s")
        self.safety.progress(self.step, "save")
        return tag

    def resume(self) -> None:
        configured = ConfiguredSettings.take(self.optimizer, self.scheduler)
        resumed = checkpoint.load_latest(self.engine, self.cfg.train.checkpoint_dir, self.groups)
        for change in self.checks.config_changes or []:
            log0(f"--allow_config_change: {change} (differs from the checkpoint)")
        state = resumed.client_state["moe_dist"]
        if state["consumed_samples"] != state["step"] * self.global_batch:
            tag_dir = os.path.join(self.cfg.train.checkpoint_dir, resumed.tag)
            raise CheckpointError(f"checkpoint {tag_dir!r}: consumed_samples ({state['consumed_samples']}) "
                                  f"!= step ({state['step']}) * global batch ({self.global_batch}); the global "
                                  f"batch size changed since it was written")
        self.step = state["step"]
        self.safety.nonfinite.skipped = state.get("skipped_steps", 0)
        # The restored optimizer and scheduler hold the base LR (and weight decay, betas, eps) of
        # the run that wrote the checkpoint; this config's apply from here on (lowering the LR
        # after a loss spike, extending train.steps).
        configured.apply(self.optimizer, self.scheduler, self.step, self.cfg.train)
        for change in schedule_changes(state["config"].get("train", {}), self.cfg.train):
            log0(f"resume: {change} (the checkpoint's value -> this config's, in force from step {self.step + 1})")
        lr_change = resume_lr_change(state["config"].get("train", {}), self.cfg.train, self.step)
        if lr_change:
            log0(f"resume: {lr_change}")
        log0(f"resumed from {resumed.tag}: step {self.step}, {state['consumed_samples']} samples consumed")

    # ---- steps -------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]):
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        domain_ids = batch["domain_ids"].to(self.device, non_blocking=True)
        return self.engine(tokens[:, :-1], tokens[:, 1:], domain_ids)

    def train_step(self, batches, stats: MoEStatsAccumulator, losses: torch.Tensor) -> None:
        """One optimizer step over grad_accum micro batches. This rank's LM and aux losses are
        added to `losses` ([2] float64, on the device) and its routing statistics to `stats`: no
        host read per micro batch."""
        step_stats = []
        for _ in range(self.cfg.train.grad_accum):
            out = self.forward(next(batches))
            self.engine.backward(out.loss)  # DeepSpeed divides by gradient_accumulation_steps
            self.engine.step()  # the optimizer steps only at the accumulation boundary
            self.safety.observe(out)
            losses += torch.stack([out.lm_loss.detach(), out.aux_loss.detach().to(out.lm_loss.device)]).double()
            step_stats.append(out.moe_stats)
            stats.add(out.moe_stats)
            del out  # else its logits ([B, S, V]) stay alive through the next micro batch's forward
        if self.after_step_routers:
            # The global pre-drop load, identical on every rank (one packed all-reduce for all
            # layers), so router state stays in sync; it stays on the device.
            for layer, load_E in step_load(step_stats, self.groups.all_reduce_sum_dp).items():
                self.after_step_routers[layer].after_step(load_E)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation LM loss over train.eval_batches micro batches per rank (the same
        batches at every evaluation), its standard error, and the eval's routing statistics:
        summed on the device, reduced over ranks in one packed all-reduce and read once."""
        valid = self.datasets.valid
        if valid is None or len(valid) < self.cfg.train.micro_batch * self.world:
            return None
        self.engine.eval()
        stats = MoEStatsAccumulator()
        loader = build_dataloader(valid, self.cfg.train.micro_batch, self.rank, self.world)
        # tokens, sequences, sum and sum of squares of sequence losses
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(loader):
            if i == self.cfg.train.eval_batches(self.world):
                break
            out = self.forward(batch)
            sums += sequence_loss_sums(out.logits_BSV, batch["tokens"][:, 1:].to(out.logits_BSV.device))
            stats.add(out.moe_stats)
            del out  # as in train_step: not alive through the next forward
        self.engine.train()
        total = self.groups.all_reduce_sum_dp(torch.cat([sums, stats.pack(self.device)]))
        values = torch.cat([total[:4], stats.summarize(total[4:], self.world)]).tolist()  # the one host read
        tokens, sequences, loss_sum, loss_sq = values[:4]
        summary = stats.unpack(values[4:])
        loss = loss_sum / max(sequences, 1.0)
        sem = standard_error(sequences, loss_sum, loss_sq)
        for layer, row in summary.items():
            self.tb.scalars(self.step, {f"moe/layer{layer}/val_dropped_fraction": row["dropped_fraction"],
                                        f"moe/layer{layer}/val_load_cv": row["load_cv"]})
            if "expert_label_counts" in row:
                self.tb.expert_domain_heatmap(self.step, layer, row["expert_label_counts"],
                                              self.checks.domain_names)
                if "mi_domain_normalized" in row:
                    self.tb.scalars(self.step, {f"moe/layer{layer}/val_mi_domain_normalized":
                                                row["mi_domain_normalized"]})
        self.tb.scalars(self.step, {"val/loss": loss, "val/perplexity": perplexity(loss), "val/loss_sem": sem})
        drops = " ".join(f"{row['dropped_fraction']:.3f}" for row in summary.values())
        log0(f"step {self.step} | validation loss {loss:.4f} ± {sem:.4f} over {int(tokens):,} tokens | "
             f"perplexity {perplexity(loss):.2f} | dropped per MoE layer {drops or '-'}")
        return loss

    def run(self, resume: bool = False, stop_at_step: int | None = None) -> TrainResult:
        train = self.cfg.train
        if resume:
            self.resume()
        end = train.steps if stop_at_step is None else min(stop_at_step, train.steps)
        result = TrainResult(step=self.step)
        loader = build_dataloader(self.datasets.train, train.micro_batch, self.rank, self.world,
                                  consumed_samples=self.step * self.global_batch,
                                  num_workers=self.cfg.data.num_workers)
        batches = iter(loader)
        stats = MoEStatsAccumulator()
        progress = Progress(train.steps, self.global_batch * train.seq_len, start_step=self.step)
        losses = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM and aux, summed over micro batches
        log0(f"training steps {self.step + 1}..{end} of {train.steps}: world {self.world}, "
             f"ep_size {self.groups.ep_size}, global batch {self.global_batch} x {train.seq_len} tokens, "
             f"{sum(p.numel() for p in self.model.parameters()):,} parameters on rank 0")
        t_start = time.perf_counter()
        self.safety.start(self.step)
        while self.step < end:
            lr = self.optimizer.param_groups[0]["lr"]
            self.train_step(batches, stats, losses)
            self.step += 1
            stop = self.safety.end_step(self.step, self.engine, self.scheduler)
            if self.step % train.log_interval == 0 or self.step == end or stop:
                result.losses[self.step] = self.log_interval(progress, losses, lr, stats)
                losses.zero_()
                stats.reset()
            if stop:
                self.stop_after_signal()
            # Save before evaluating: a failing evaluation must not cost the step's checkpoint.
            if train.checkpoint_dir and ((train.checkpoint_interval and self.step % train.checkpoint_interval == 0)
                                         or self.step == end):
                self.save()
            if (train.eval_interval and self.step % train.eval_interval == 0) or self.step == train.steps:
                val = self.evaluate()
                if val is not None:
                    result.val_losses[self.step] = val
                self.safety.progress(self.step, "evaluation")
        self.safety.close()
        result.step = self.step
        log0(f"done: step {self.step} in {format_duration(time.perf_counter() - t_start)}")
        self.tb.close()
        return result

    def stop_after_signal(self) -> None:
        """Every rank agreed to stop after this step: save it (no evaluation: the time before a
        scheduler's SIGKILL is short) and leave with the preemption status."""
        saved = self.save() if self.cfg.train.checkpoint_dir else None
        where = (f"checkpoint {saved} committed; continue with --resume" if saved
                 else "no train.checkpoint_dir: nothing saved")
        self.tb.close()
        raise RunStopped(PREEMPTED, f"stopped after step {self.step}: {self.safety.stop_reason}; {where}")

    def log_interval(self, progress: Progress, losses: torch.Tensor, lr: float,
                     stats: MoEStatsAccumulator) -> float:
        """Log the interval: its summed losses and every MoE layer's statistics go over the
        data-parallel ranks in one packed all-reduce and come to the host in one read. Returns
        the mean LM loss (over micro batches and ranks)."""
        tokens_per_s, sec_per_step = progress.interval(self.step)
        total = self.groups.all_reduce_sum_dp(torch.cat([losses, stats.pack(self.device)]))
        draws = max(stats.batches, 1) * self.world  # micro batches of every rank
        values = torch.cat([total[:2] / draws, stats.summarize(total[2:], self.world)]).tolist()  # the one read
        loss, aux = values[0], values[1]
        grad_norm = self.safety.grad_norm
        times = self.safety.times.take()
        self.tb.scalars(self.step, {"train/loss": loss, "train/perplexity": perplexity(loss),
                                    "train/aux_loss": aux, "train/lr": lr, "train/grad_norm": grad_norm,
                                    "train/tokens_per_s": tokens_per_s,
                                    "train/skipped_steps": self.safety.skipped})
        if times is not None:
            self.tb.scalars(self.step, {"train/step_time_min": times.min, "train/step_time_max": times.max,
                                        "train/step_time_slowest_rank": times.max_rank})
        self.tb.moe(self.step, stats.unpack(values[2:]))
        self.tb.flush()
        log0(progress.line(self.step, loss, lr, grad_norm, tokens_per_s, sec_per_step, times,
                           self.safety.skipped))
        return loss


def pretrain(cfg: RunConfig, *, resume: bool = False, stop_at_step: int | None = None,
             config_path: str | None = None, allow_config_change: bool = False,
             break_lock: bool = False, run=None) -> TrainResult:
    """Validate everything, then train. Collective: every rank calls it with the same arguments.
    `run`: rank 0's claim on the checkpoint directory if the caller made it (run_dir.claim)."""
    checks = preflight(cfg, runtime.env_world_size(), cfg.train.deepspeed_config, resume=resume,
                       allow_config_change=allow_config_change, break_lock=break_lock, run=run)
    trainer = None
    try:
        trainer = Trainer(cfg, checks, config_path)
        return trainer.run(resume=resume, stop_at_step=stop_at_step)
    finally:
        if trainer is not None:
            trainer.safety.close()  # signal handlers and watchdog end with the run, however it ends
        if checks.run is not None:
            checks.run.release()
