#!/usr/bin/env python
"""Pretrain an MoE language model; the script the `deepspeed` launcher starts on every rank.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_cpu.yaml
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_cpu.yaml --resume
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_cpu.yaml --resume auto
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config configs/gpu_125m_e16.yaml

On a CPU-only machine `--num_gpus N` starts N processes (DeepSpeed's CPU accelerator, gloo).
`--set section.key=value` overrides one config value (YAML syntax), e.g. `--set train.steps=50`.
`--trace DIR` writes the routing trace, `--replay_routes DIR` replays one (docs/routing_trace.md).
Configuration errors are reported before any process group or model exists (errors in the config
file itself before DeepSpeed is imported), once per node, exit status 2 (so is
a train.checkpoint_dir that another run holds: `--break_lock` takes over a dead run's lock, and a
checkpoint that cannot be resumed, also when that shows only at DeepSpeed's load).
Other exit statuses (moe_dist/train/safety/exits.py, docs/launch.md): 3 non-finite training stopped,
4 watchdog (no step within train.watchdog_timeout), 28 disk full at a checkpoint, 30 checkpoint folder
not writable at a checkpoint (read-only filesystem, no permission), 75 stopped by
SIGTERM/SIGINT/SIGUSR1 after committing a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# Noise that says nothing about this run, printed once per rank: Megatron-Core's optional-kernel
# notices (its data pipeline needs neither) and a deprecation inside DeepSpeed's ZeRO all-gather.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

# Only what the config check needs is imported here: DeepSpeed and Megatron-Core (most of a
# start-up) come after it, so a config error answers before them (BENCHMARKS.md, "Config errors").
from moe_dist.common.config import ConfigError  # noqa: E402
from moe_dist.train.config import check_world_size, load_run_config  # noqa: E402
from moe_dist.train.safety.exits import OVERFLOW, RunStopped  # noqa: E402
from moe_dist.train.safety.job import report_exit  # noqa: E402
from moe_dist.train.safety.signals import guard_launcher  # noqa: E402


def resume_mode(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: --resume takes no value, or 'auto'")
    return value


def decide_resume(mode: bool | str, checkpoint_dir: str | None) -> bool:
    """--resume (True), none (False), or "auto": resume exactly when the folder has a committed `latest`.
    A folder with tags but no `latest`, or a `latest` whose tag is broken, is then refused by
    preflight as it is without auto (a new run would overwrite the one, the other cannot load)."""
    if mode != "auto":
        return bool(mode)
    if not checkpoint_dir:
        raise ConfigError("--resume auto needs train.checkpoint_dir (where it looks for a checkpoint)")
    from moe_dist.checkpoint.training import read_latest

    tag = read_latest(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if os.environ.get("RANK", "0") == "0":
        print(f"--resume auto: {f'resuming from {tag!r} in' if tag else 'no committed checkpoint in'} "
              f"train.checkpoint_dir {checkpoint_dir!r}{'' if tag else '; starting a new run'}", flush=True)
    return tag is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--config", required=True, help="training config YAML (model, moe, data, train)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON; overrides train.deepspeed_config")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=resume_mode, metavar="auto",
                   help="continue from the latest complete checkpoint in train.checkpoint_dir; '--resume auto': "
                        "continue when train.checkpoint_dir holds a committed checkpoint ('latest'), else start "
                        "a new run (for schedulers that requeue the same command)")
    p.add_argument("--allow_config_change", action="store_true",
                   help="with --resume: continue although settings that change the data order or routing "
                        "(seeds, top_k, capacity, ...), or the tokenizer's or data's content, differ from the "
                        "checkpoint's (they are listed)")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="checkpoint and exit after this step (e.g. before a job's time limit); the LR "
                        "schedule still spans train.steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write the routing trace to DIR (sets trace.dir; docs/routing_trace.md)")
    p.add_argument("--replay_routes", default=None, metavar="TRACE_DIR",
                   help="take the routes recorded in this routing trace instead of the routers' (sets trace.replay)")
    p.add_argument("--break_lock", action="store_true",
                   help="take over train.checkpoint_dir's run.lock left by a run that is gone (never one "
                        "that runs on this host)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def report_config_error(e: ConfigError) -> None:
    """One line per node, not per rank: the processes of a node check the same config against the
    same files, so the first local process speaks for them (another node, whose files may differ,
    speaks for itself)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"config error: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    guard_launcher()  # before the slow start-up: a rank never outlives its launcher
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    # Quoted: a path is a YAML string whatever it looks like.
    if args.trace:
        overrides.append(f"trace.dir={json.dumps(args.trace)}")
    if args.replay_routes:
        overrides.append(f"trace.replay={json.dumps(args.replay_routes)}")
    try:
        cfg = load_run_config(args.config, overrides)
        if "WORLD_SIZE" in os.environ:  # set by the launcher; in one plain process preflight checks it
            check_world_size(cfg.model, int(os.environ["WORLD_SIZE"]))
    except ConfigError as e:
        report_config_error(e)
        return 2
    from moe_dist.checkpoint.files import CheckpointError
    from moe_dist.checkpoint.training import EXIT_NO_SPACE, EXIT_NOT_WRITABLE, DiskSpaceError, NotWritableError
    from moe_dist.moe.rank_budget import BudgetOverflowError
    from moe_dist.train.safety.run_dir import claim

    try:
        args.resume = decide_resume(args.resume, cfg.train.checkpoint_dir)
        # The run lock before the trainer's imports (DeepSpeed and Megatron-Core: most of a
        # start-up): a second job on this checkpoint_dir is refused before it pays for them.
        # Preflight checks the rest under it.
        run = claim(cfg.train.checkpoint_dir, args.resume, args.break_lock)
        from moe_dist.train.trainer import pretrain

        pretrain(cfg, resume=args.resume, stop_at_step=args.stop_at_step, config_path=args.config,
                 allow_config_change=args.allow_config_change, break_lock=args.break_lock, run=run)
        # Every rank is here after a complete run: tear the process groups down now, as torch asks
        # of a finished job, rather than in the interpreter's teardown (where ranks of complete runs
        # were seen to abort with "terminate called without an active exception", exit 250).
        from moe_dist.parallel import runtime

        runtime.destroy()
    except ConfigError as e:
        report_config_error(e)
        return 2
    except DiskSpaceError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NO_SPACE
    except NotWritableError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NOT_WRITABLE
    except CheckpointError as e:  # what preflight could not see: a load that failed, a tag changed since
        print(f"checkpoint error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"rank {os.environ.get('RANK', '0')}: {e} (exit {e.code})", file=sys.stderr, flush=True)
        return e.code
    except BudgetOverflowError as e:  # every rank raises it in the same forward (the count exchange)
        print(f"rank {os.environ.get('RANK', '0')}: stopped: {e} (exit {OVERFLOW})", file=sys.stderr, flush=True)
        return OVERFLOW
    return 0


if __name__ == "__main__":
    # The status also goes to launch/job.py, if it runs the job: DeepSpeed's runner may be gone
    # or pass on a different one (moe_dist/train/safety/job.py).
    try:
        status = main()
    except SystemExit as e:  # argparse's usage error
        report_exit(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        report_exit(1)
        raise
    sys.exit(report_exit(status))
