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
from moe_dist.evaluate.precision import domain_loss_sums, sequence_loss_sums, standard_error, token_nll
from moe_dist.evaluate.trace_replay import RouteReplay
from moe_dist.model.compile import compile_blocks
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel import runtime
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import RunConfig
from moe_dist.train.engine import build_engine
from moe_dist.train.flops import (device_peak, flops_line, mfu, model_flops_per_token, peak_memory_bytes,
                                  step_log_suffix)
from moe_dist.train.metrics_log import build_metrics_logger, check_tracker_packages
from moe_dist.train.moe_metrics import MoEStatsAccumulator, budget_line, step_load, wants_step_load
from moe_dist.train.preflight import Preflight, preflight, requested_samples
from moe_dist.train.progress import Progress, format_duration
from moe_dist.train.run_record import write_run_record
from moe_dist.train.safety.exits import PREEMPTED, RunStopped
from moe_dist.train.safety.guard import RunSafety
from moe_dist.train.schedule import ConfiguredSettings, resume_lr_change, schedule_changes
from moe_dist.train.tb_logger import perplexity
from moe_dist.train.tracing import RunTracing, open_replay


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> mean LM loss
    val_losses: dict[int, float] = field(default_factory=dict)


def log0(message: str) -> None:
    if runtime.rank() == 0:
        print(message, flush=True)


class Trainer:
    def __init__(self, cfg: RunConfig, checks: Preflight, config_path: str | None = None,
                 replay: RouteReplay | None = None) -> None:
        """`replay`: the routes to force (trace.replay, opened by `open_replay` before preflight)."""
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
        self.tb = build_metrics_logger(train, self.rank == 0, cfg.to_dict(), self.run_id)
        self.flops = model_flops_per_token(cfg.model, train.seq_len)
        self.peak_tflops, source = device_peak(self.device, train.peak_tflops)
        log0(flops_line(self.flops, self.peak_tflops, source, self.device))
        self.safety = RunSafety(train, [i for i, _ in self.model.moe_layers()], device=self.device)
        routers = {layer: moe.router for layer, moe in self.model.moe_layers()}
        # Only routers with an after_step hook (aux-loss-free bias balancing) cost a per-step all-reduce.
        self.after_step_routers = routers if wants_step_load(routers.values()) else {}
        self.tracing = RunTracing(cfg, replay, rank=self.rank, world=self.world, ep_size=self.groups.ep_size,
                                  eod=self.tokenizer.eod, log=log0)

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
        # The restored optimizer and scheduler hold the run's base LR (and weight decay, betas, eps)
        # that wrote the checkpoint; this config's apply from here on (a lower LR, more steps).
        configured.apply(self.optimizer, self.scheduler, self.step, self.cfg.train)
        written = state["config"].get("train", {})
        for change in schedule_changes(written, self.cfg.train):
            log0(f"resume: {change} (the checkpoint's value -> this config's, in force from step {self.step + 1})")
        if lr_change := resume_lr_change(written, self.cfg.train, self.step):
            log0(f"resume: {lr_change}")
        log0(f"resumed from {resumed.tag}: step {self.step}, {state['consumed_samples']} samples consumed")

    # ---- steps -------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "train", micro: int = 0,
                step_counts: dict | None = None):
        """One forward of the training step about to run (`phase` train) or of the evaluation at
        this step (eval): `micro` numbers its forwards, for the routing trace and route replay.
        `step_counts`: the global_batch balance scope's running counts of this optimizer step
        (the previous micro batch's `ModelOutput.step_counts`; None at the step's first)."""
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        domain_ids = batch["domain_ids"].to(self.device, non_blocking=True)
        step = self.step + 1 if phase == "train" else self.step
        traced = self.tracing.traced(phase, step)
        forced = self.tracing.forced(phase, step, micro, domain_ids.numel(), self.device)
        out = self.engine(tokens[:, :-1], tokens[:, 1:], domain_ids, **self.balance_inputs(batch),
                          step_counts=step_counts, trace=traced, forced_routes=forced)
        if traced:  # the trace's host reads, after the forward and outside the model
            self.tracing.add(micro, tokens[:, :-1], domain_ids, out.routes)
        return out

    def balance_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's padding mask (the loader's batch has one only when it masks something) and,
        for a sequence balance scope, its documents."""
        out = {}
        mask = batch.get("loss_mask")
        if mask is not None:
            out["valid_BS"] = mask.to(self.device, non_blocking=True).bool()
        moe = self.cfg.model.moe
        if (moe is not None and "segment_ids" in batch
                and "sequence" in moe.aux_loss.scopes().values()):
            out["segment_ids_BS"] = batch["segment_ids"].to(self.device, non_blocking=True)
        return out

    def train_step(self, batches, stats: MoEStatsAccumulator, losses: torch.Tensor) -> None:
        """One optimizer step over grad_accum micro batches: this rank's LM, aux and MTP losses go
        into `losses` ([3] float64, on the device) and its statistics into `stats`, with no host read;
        the global_batch scope's running counts start empty at each step (docs/training.md)."""
        step_stats = []
        step_counts = None
        for micro in range(self.cfg.train.grad_accum):
            out = self.forward(next(batches), "train", micro, step_counts)
            step_counts = out.step_counts or None
            self.engine.backward(out.loss)  # DeepSpeed divides by gradient_accumulation_steps
            self.engine.step()  # the optimizer steps only at the accumulation boundary
            self.safety.observe(out)
            mtp_loss = out.lm_loss.new_zeros(()) if out.mtp_loss is None else out.mtp_loss.detach()
            losses += torch.stack([out.lm_loss.detach(), out.aux_loss.detach().to(out.lm_loss.device),
                                   mtp_loss]).double()
            step_stats.append(out.moe_stats)
            stats.add(out.moe_stats)
            del out  # else its logits ([B, S, V]) stay alive through the next micro batch's forward
        self.tracing.flush("train", self.step + 1)
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
        # tokens, sequences, sum and sum of squares of sequence losses; with domain labels, the
        # summed loss and the tokens of each domain
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        L = self.cfg.model.num_labels
        domain_sums = torch.zeros(2, L, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(loader):
            if i == self.cfg.train.eval_batches(self.world):
                break
            out = self.forward(batch, "eval", i)
            targets = batch["tokens"][:, 1:].to(out.logits_BSV.device)
            nll_BS = token_nll(out.logits_BSV, targets)
            valid_BS = self.balance_inputs(batch).get("valid_BS")
            sums += sequence_loss_sums(out.logits_BSV, targets, nll_BS, valid_BS)
            if L:
                labels_BS = batch["domain_ids"].to(nll_BS.device)
                if valid_BS is not None:  # padding counts in no domain
                    labels_BS = torch.where(valid_BS, labels_BS, torch.full_like(labels_BS, -1))
                domain_sums += domain_loss_sums(nll_BS, labels_BS, L)
            stats.add(out.moe_stats)
            del out, nll_BS  # as in train_step: not alive through the next forward
        self.engine.train()
        self.tracing.flush("eval", self.step)
        total = self.groups.all_reduce_sum_dp(torch.cat([sums, domain_sums.reshape(-1), stats.pack(self.device)]))
        n = 4 + 2 * L
        values = torch.cat([total[:n], stats.summarize(total[n:], self.world)]).tolist()  # the one host read
        tokens, sequences, loss_sum, loss_sq = values[:4]
        domains = self.domain_losses(values[4:4 + L], values[4 + L:n])
        summary = stats.unpack(values[n:])
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
        for name, (domain_loss, _) in domains.items():
            self.tb.scalars(self.step, {f"val/domain/{name}/loss": domain_loss,
                                        f"val/domain/{name}/perplexity": perplexity(domain_loss)})
        drops = " ".join(f"{row['dropped_fraction']:.3f}" for row in summary.values())
        log0(f"step {self.step} | validation loss {loss:.4f} ± {sem:.4f} over {int(tokens):,} tokens | "
             f"perplexity {perplexity(loss):.2f} | dropped per MoE layer {drops or '-'}")
        if domains:
            log0(f"step {self.step} | validation per domain (loss / perplexity / tokens): " + ", ".join(
                f"{name} {value:.4f} / {perplexity(value):.2f} / {int(count):,}"
                for name, (value, count) in domains.items()))
        return loss

    def domain_losses(self, loss_sums: list[float], counts: list[float]) -> dict[str, tuple[float, float]]:
        """{domain name: (mean token loss, tokens)} for the domains the validation batches held."""
        names = list(self.checks.domain_names or [])
        names += [f"domain{i}" for i in range(len(names), len(counts))]
        return {names[i]: (loss_sums[i] / counts[i], counts[i]) for i in range(len(counts)) if counts[i] > 0}

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
        # LM, aux and MTP, summed over micro batches
        losses = torch.zeros(3, dtype=torch.float64, device=self.device)
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
        values = torch.cat([total[:3] / draws, stats.summarize(total[3:], self.world)]).tolist()  # the one read
        loss, aux, mtp = values[0], values[1], values[2]
        grad_norm = self.safety.grad_norm
        times = self.safety.times.take()
        # Host-side counters only (tokens/s from the clock, the allocator's peak): no device read.
        utilization = mfu(self.flops.train, tokens_per_s, self.world, self.peak_tflops)
        memory, _ = peak_memory_bytes(self.device)
        self.tb.scalars(self.step, {"train/loss": loss, "train/perplexity": perplexity(loss),
                                    "train/aux_loss": aux, "train/lr": lr, "train/grad_norm": grad_norm,
                                    "train/tokens_per_s": tokens_per_s,
                                    "train/skipped_steps": self.safety.skipped,
                                    "train/model_tflops_per_device":
                                        self.flops.train * tokens_per_s / self.world / 1e12,
                                    "train/mfu": utilization, "train/peak_memory_gib": memory / 2**30})
        if self.cfg.model.mtp_layers:
            self.tb.scalars(self.step, {"train/mtp_loss": mtp})
        if times is not None:
            self.tb.scalars(self.step, {"train/step_time_min": times.min, "train/step_time_max": times.max,
                                        "train/step_time_slowest_rank": times.max_rank})
        summary = stats.unpack(values[3:])
        self.tb.moe(self.step, summary)
        self.tb.flush()
        line = progress.line(self.step, loss, lr, grad_norm, tokens_per_s, sec_per_step, times, self.safety.skipped)
        if self.cfg.model.mtp_layers:
            line += f" | mtp loss {mtp:.4f}"
        log0(line + step_log_suffix(utilization, memory))
        if budget := budget_line(self.step, summary):
            log0(budget)
        return loss


def pretrain(cfg: RunConfig, *, resume: bool = False, stop_at_step: int | None = None,
             config_path: str | None = None, allow_config_change: bool = False,
             break_lock: bool = False, run=None) -> TrainResult:
    """Validate everything, then train. Collective: every rank calls it with the same arguments.
    `run`: rank 0's claim on the checkpoint directory if the caller made it (run_dir.claim)."""
    check_tracker_packages(cfg.train)
    replay = open_replay(cfg, runtime.env_rank(), runtime.env_world_size())  # a cheap read, before the rest
    checks = preflight(cfg, runtime.env_world_size(), cfg.train.deepspeed_config, resume=resume,
                       allow_config_change=allow_config_change, break_lock=break_lock, run=run)
    trainer = record = None
    try:
        if cfg.train.run_dir and runtime.env_rank() == 0:
            record = write_run_record(cfg.train.run_dir, cfg.to_dict(), checks.ds_config, resume=resume,
                                      run_id=checks.run.run_id if checks.run else None)
        trainer = Trainer(cfg, checks, config_path, replay=replay)
        return trainer.run(resume=resume, stop_at_step=stop_at_step)
    except BaseException as e:
        if record is not None:  # the launcher prints it after this; the log keeps it too
            record.write(f"run ended: {type(e).__name__}: {e}\n")
        raise
    finally:
        if trainer is not None:
            trainer.safety.close()  # signal handlers and watchdog end with the run, however it ends
        if record is not None:
            record.close()
        if checks.run is not None:
            checks.run.release()
