"""The training config file: top-level sections `model`, `moe`, `data`, `train`, `cpu` (strict:
unknown sections and keys are errors that name the allowed ones).

One source of truth per quantity:
- sequence length: `train.seq_len` (a `data.seq_length` that differs is an error);
- batch sizes: `train.micro_batch`, `train.grad_accum` and (optional) `train.global_batch`; the
  DeepSpeed JSON may repeat them only with the same values (`ds_config.py`);
- learning rate schedule and optimizer: the `train` section (the DeepSpeed JSON must not carry an
  `optimizer` or `scheduler` section).
"""

from __future__ import annotations

import copy
import glob
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from moe_dist.common.config import ConfigError, check, check_choice, check_int, from_dict, to_dict
from moe_dist.data.config import DataConfig
from moe_dist.model.config import ModelConfig, parse_model_config


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float: YAML 1.1 wants a dot (`1.0e-3`) and would
    otherwise hand the trainer the string '1e-3' for a learning rate."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text_or_file, where: str | None = None):
    """YAML -> Python values; a syntax error is a ConfigError `where:line:col: problem` (where:
    the file's path, else the stream's name), so that it exits 2 like any other config error."""
    try:
        return yaml.load(text_or_file, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = where or getattr(text_or_file, "name", None) or "<yaml>"
        location = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        problem = str(e.problem or e.context)
        if e.context and e.context_mark is not None and mark is not e.context_mark:
            problem += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError(f"{location}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where or getattr(text_or_file, 'name', '<yaml>')}: YAML error: {e}") from None


LR_DECAY_STYLES = ("cosine", "constant", "linear", "wsd")
# The shape of warmup-stable-decay's decay phase (moe_dist/train/schedule.py, `decay_factor`).
DECAY_SHAPES = ("1-sqrt", "linear", "cosine")
SECTIONS = ("model", "moe", "data", "train", "cpu", "trace")
# Keys that moved to another section: the old spelling is an error naming the new one.
MOVED_KEYS = {"train.cpu_threads": "cpu.threads", "train.cpu_keep_freed_memory": "cpu.keep_freed_memory"}


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbSection:
    """`train.wandb`: log to Weights & Biases too (the extra `.[wandb]`; moe_dist/train/trackers.py)."""

    project: str
    entity: str | None = None
    name: str | None = None  # the run's display name (None: moe_dist's run id)
    dir: str | None = None  # where W&B keeps its files (None: ./wandb)
    mode: str = "online"  # offline: nothing leaves the machine (`wandb sync` uploads later)

    def __post_init__(self) -> None:
        check(isinstance(self.project, str) and self.project != "",
              f"train.wandb.project must be a non-empty string, got {self.project!r}")
        check_choice("train.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class MlflowSection:
    """`train.mlflow`: log to MLflow too (the extra `.[mlflow]`; moe_dist/train/trackers.py)."""

    tracking_uri: str  # http(s)://server, or file:///abs/path (a file store)
    experiment: str = "moe_dist"
    run_name: str | None = None  # None: moe_dist's run id

    def __post_init__(self) -> None:
        for name in ("tracking_uri", "experiment"):
            value = getattr(self, name)
            check(isinstance(value, str) and value != "", f"train.mlflow.{name} must be a non-empty string, "
                                                          f"got {value!r}")


@dataclass
class TrainSection:
    steps: int
    seq_len: int
    micro_batch: int  # sequences per rank per forward
    deepspeed_config: str  # path of the DeepSpeed JSON (ZeRO stage, precision, clipping)
    grad_accum: int = 1
    # micro_batch * grad_accum * world size; optional, checked against the launch when given.
    global_batch: int | None = None
    lr: float = 3e-4
    min_lr: float = 0.0  # where the decay ends (at `steps`)
    warmup_steps: int = 0  # linear warmup from 0 to lr
    lr_decay: str = "cosine"  # cosine, linear, constant, or wsd (warmup-stable-decay)
    # wsd only: the decay phase is the last `decay_steps` steps (it starts at steps - decay_steps),
    # shaped by `decay_shape` (None: "1-sqrt"). Branching a decay from a stable-phase checkpoint:
    # docs/training.md, "Learning-rate schedules".
    decay_steps: int | None = None
    decay_shape: str | None = None
    weight_decay: float = 0.1  # on matrices (embeddings and experts included), not on norm weights
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    log_interval: int = 10
    eval_interval: int = 0  # 0: only at the end
    eval_iters: int = 4  # validation micro batches per rank
    # Validation tokens per evaluation over all ranks (rounded up to whole micro batches); when
    # set, it replaces eval_iters. The logged standard error says what precision it gives.
    eval_tokens: int | None = None
    checkpoint_interval: int = 0  # 0: only at the end (when checkpoint_dir is set)
    checkpoint_dir: str | None = None
    keep_last: int | None = None  # keep the newest N complete checkpoints (None: all)
    tensorboard_dir: str | None = None
    # Experiment trackers beside TensorBoard (None: off); the same tags (docs/training.md).
    wandb: WandbSection | None = None
    mlflow: MlflowSection | None = None
    # The run folder: the resolved config, the DeepSpeed JSON, the launch command and rank 0's
    # output (train.log) are written here at start (moe_dist/train/run_record.py). None: not written.
    run_dir: str | None = None
    # The device's peak FLOP/s in TFLOP/s for the MFU in the step log; None: looked up from the
    # device name (moe_dist/train/flops.py, PEAK_TFLOPS), and no MFU where it is not known.
    peak_tflops: float | None = None
    seed: int = 1234  # model initialization and per-rank RNG streams
    # A consolidated checkpoint (tools/convert_checkpoint.py consolidate) to start from, at any
    # ep_size, with a fresh optimizer and step 0: fine-tuning. Ignored by --resume, which
    # continues the run's own checkpoint.
    init_from: str | None = None
    # Run safety (docs/reliability.md). Seconds before a collective on any process group (WORLD
    # and DeepSpeed's expert groups) fails instead of waiting; DeepSpeed's own default is 600.
    collective_timeout: float = 600.0
    # Seconds without a completed step (or evaluation, or save) before every rank prints its
    # stacks and the job exits 4 naming the slowest rank; 0 disables.
    watchdog_timeout: float = 1800.0
    # Consecutive optimizer steps skipped for a non-finite loss or gradient norm before the run
    # stops with exit status 3.
    max_consecutive_skips: int = 5
    # Compile each transformer block with torch.compile, as torchtitan does (moe_dist/model/compile.py;
    # docs/training.md, "Compiling the blocks"). The first steps then include the compilation.
    compile: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("seq_len", 1), ("micro_batch", 1), ("grad_accum", 1),
                              ("warmup_steps", 0), ("log_interval", 1), ("eval_interval", 0),
                              ("eval_iters", 1), ("checkpoint_interval", 0), ("seed", 0)):
            check_int(f"train.{name}", getattr(self, name), minimum)
        if self.global_batch is not None:
            check_int("train.global_batch", self.global_batch, 1)
        if self.keep_last is not None:
            check_int("train.keep_last", self.keep_last, 1)
        if self.eval_tokens is not None:
            check_int("train.eval_tokens", self.eval_tokens, 1)
        check(isinstance(self.deepspeed_config, str) and self.deepspeed_config != "",
              f"train.deepspeed_config must be the path of a DeepSpeed JSON, got {self.deepspeed_config!r}")
        for name in ("lr", "min_lr", "weight_decay", "adam_eps"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                  f"train.{name} must be a number >= 0, got {value!r}")
        check(isinstance(self.compile, bool), f"train.compile must be true or false, got {self.compile!r}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr!r}")
        check(self.min_lr <= self.lr, f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        check(self.warmup_steps <= self.steps,
              f"train.warmup_steps ({self.warmup_steps}) must be <= train.steps ({self.steps})")
        check_choice("train.lr_decay", self.lr_decay, LR_DECAY_STYLES)
        if self.lr_decay == "wsd":
            check(self.decay_steps is not None,
                  "train.decay_steps must be set for train.lr_decay 'wsd' (the length of the decay phase, "
                  "which ends at train.steps)")
            check_int("train.decay_steps", self.decay_steps, 1)
            check(self.decay_steps <= self.steps - self.warmup_steps,
                  f"train.decay_steps ({self.decay_steps}) must be <= train.steps - train.warmup_steps "
                  f"({self.steps} - {self.warmup_steps}): the decay starts after the warmup")
            if self.decay_shape is not None:
                check_choice("train.decay_shape", self.decay_shape, DECAY_SHAPES)
        else:
            for name in ("decay_steps", "decay_shape"):
                check(getattr(self, name) is None,
                      f"train.{name} ({getattr(self, name)!r}) applies only to train.lr_decay 'wsd', "
                      f"got lr_decay {self.lr_decay!r}")
        for name, minimum in (("collective_timeout", 1e-3), ("watchdog_timeout", 0.0)):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum,
                  f"train.{name} must be a number of seconds >= {minimum:g}, got {value!r}")
        check_int("train.max_consecutive_skips", self.max_consecutive_skips, 1)
        if self.peak_tflops is not None:
            check(isinstance(self.peak_tflops, (int, float)) and not isinstance(self.peak_tflops, bool)
                  and self.peak_tflops > 0, f"train.peak_tflops must be a number > 0, got {self.peak_tflops!r}")
        for name, section in (("wandb", WandbSection), ("mlflow", MlflowSection)):
            value = getattr(self, name)
            check(value is None or isinstance(value, section),
                  f"train.{name} must be a mapping of its settings, got {value!r}")
        check(isinstance(self.adam_betas, (list, tuple)) and len(self.adam_betas) == 2
              and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas),
              f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = [float(b) for b in self.adam_betas]


    def eval_batches(self, world_size: int) -> int:
        """Validation micro batches per rank: eval_iters, or enough for eval_tokens."""
        if self.eval_tokens is None:
            return self.eval_iters
        return -(-self.eval_tokens // (self.micro_batch * self.seq_len * world_size))


@dataclass
class CpuSection:
    """Settings of a training process on CPU; ignored where CUDA is available."""

    # torch threads per rank (None: this node's cores / processes on it).
    threads: int | None = None
    # glibc keeps freed memory for the next step instead of unmapping and faulting it in again
    # (moe_dist/common/malloc.py); the process's resident size then does not shrink.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None:
            check_int("cpu.threads", self.threads, 1)
        check(isinstance(self.keep_freed_memory, bool),
              f"cpu.keep_freed_memory must be true or false, got {self.keep_freed_memory!r}")


@dataclass
class TraceSection:
    """The routing trace and route replay (docs/routing_trace.md); off unless `dir` or `replay`."""

    dir: str | None = None  # where each rank writes its trace files (None: no trace)
    interval: int = 50  # trace the training steps that are multiples of this
    layers: list[int] | None = None  # MoE layer indices traced (None: every MoE layer)
    tokens: int | str = 256  # traced tokens per micro batch and layer, evenly strided, or "all"
    eval: bool = True  # also trace every evaluation's forwards (the same tokens each time)
    max_file_mb: float = 64.0  # rows past this (uncompressed size) are left out of a file
    max_total_mb: float = 1024.0  # per rank: tracing stops once its files reach this
    replay: str | None = None  # a trace directory whose routes this run takes instead of its routers'
    replay_weights: bool = False  # take the trace's combine weights too (else the router's own at the ids)

    def __post_init__(self) -> None:
        check(self.dir is None or (isinstance(self.dir, str) and self.dir != ""),
              f"trace.dir must be a directory path or null, got {self.dir!r}")
        check(self.replay is None or (isinstance(self.replay, str) and self.replay != ""),
              f"trace.replay must be a trace directory or null, got {self.replay!r}")
        check_int("trace.interval", self.interval, 1)
        check(self.tokens == "all" or (isinstance(self.tokens, int) and not isinstance(self.tokens, bool)
                                       and self.tokens >= 1),
              f"trace.tokens must be an integer >= 1 or 'all', got {self.tokens!r}")
        check(self.layers is None or (isinstance(self.layers, list) and self.layers
                                      and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)),
              f"trace.layers must be a non-empty list of MoE layer indices or null, got {self.layers!r}")
        for name in ("eval", "replay_weights"):
            check(isinstance(getattr(self, name), bool), f"trace.{name} must be true or false, got "
                                                         f"{getattr(self, name)!r}")
        for name in ("max_file_mb", "max_total_mb"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                  f"trace.{name} must be a number of MiB > 0, got {value!r}")
        check(not (self.replay_weights and self.replay is None), "trace.replay_weights needs trace.replay")

    @property
    def tokens_per_layer(self) -> int | None:
        return None if self.tokens == "all" else self.tokens


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainSection
    cpu: CpuSection = field(default_factory=CpuSection)
    trace: TraceSection = field(default_factory=TraceSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the resolved config (stored in checkpoints and logs)."""
        out = {"model": to_dict(self.model), "data": to_dict(self.data), "train": to_dict(self.train),
               "cpu": to_dict(self.cpu), "trace": to_dict(self.trace)}
        out["moe"] = out["model"].pop("moe")
        return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` (value parsed as YAML) -> a copy of raw with those keys set."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, value = item.partition("=")
        check(sep == "=" and path != "", f"override {item!r} must look like section.key=value")
        keys = path.split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            check(isinstance(node, dict), f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = load_yaml(value, where=f"--set {item!r}")
    return raw


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Whole config file -> RunConfig, raising ConfigError on the first bad value. Data files are
    checked to exist and be non-empty here (by the data section), before any expensive work."""
    check(isinstance(raw, dict), f"a config file must hold a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    check(not unknown, f"unknown config section(s) {unknown}; allowed sections are {list(SECTIONS)}")
    check("model" in raw and "train" in raw, "a config needs `model:` and `train:` sections")
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        check(not (isinstance(raw.get(section), dict) and key in raw[section]), f"{old} moved to {new}")
    train = from_dict(TrainSection, raw["train"], "train")
    cpu = from_dict(CpuSection, raw.get("cpu"), "cpu")
    trace = from_dict(TraceSection, raw.get("trace"), "trace")
    model = parse_model_config(raw["model"], raw.get("moe"))
    moe_layers = model.moe_layer_indices
    if trace.layers is not None:
        unknown = [i for i in trace.layers if i not in moe_layers]
        check(not unknown, f"trace.layers {unknown} are not MoE layers; the model's MoE layers are {moe_layers}")
    check(not ((trace.dir or trace.replay) and not moe_layers),
          "trace.dir / trace.replay need a model with MoE layers (model.moe_every > 0 and a moe section)")
    data_raw = dict(raw.get("data") or {})
    if "seq_length" in data_raw and data_raw["seq_length"] != train.seq_len:
        raise ConfigError(f"data.seq_length ({data_raw['seq_length']}) differs from train.seq_len "
                          f"({train.seq_len}); set only train.seq_len")
    data_raw["seq_length"] = train.seq_len
    data = DataConfig.from_dict(data_raw)
    check(train.seq_len <= model.max_seq_len,
          f"train.seq_len ({train.seq_len}) must be <= model.max_seq_len ({model.max_seq_len})")
    check(not model.mtp_layers or train.seq_len >= 2,
          f"model.mtp_layers ({model.mtp_layers}) predicts token t+2 and needs train.seq_len >= 2, got "
          f"{train.seq_len}")
    return RunConfig(model=model, data=data, train=train, cpu=cpu, trace=trace)


def read_config_file(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The config file's sections, unchecked, with the `section.key=value` overrides applied; for
    tools that read only some sections (tools/estimate_memory.py needs no data files)."""
    try:
        with open(path) as f:
            raw = load_yaml(f, where=path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory") from None
    check(isinstance(raw, (dict, type(None))),
          f"{path}: a config file must hold a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw or {}, overrides or [])


def load_run_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    return parse_run_config(read_config_file(path, overrides))


def numa_nodes() -> int:
    """NUMA nodes of this machine (0 where the kernel does not say)."""
    return len(glob.glob("/sys/devices/system/node/node[0-9]*"))


def check_world_size(model: ModelConfig, world_size: int) -> None:
    """The launch's world size against `moe.ep_size`, with the hint a CPU user needs: without
    `--num_gpus` the deepspeed launcher starts one process per GPU, and on a machine without GPUs
    one per NUMA node, so a 2-way expert-parallel config gets world size 1. Light (no DeepSpeed,
    no Megatron-Core): launch/pretrain.py checks it before those imports, preflight again."""
    moe = model.moe
    if moe is None:
        return
    from moe_dist.parallel.groups import validate_parallel_sizes

    try:
        validate_parallel_sizes(world_size, moe.ep_size, moe.num_experts)
    except ConfigError as e:
        if moe.ep_size < 1 or world_size % moe.ep_size == 0:
            raise
        nodes = numa_nodes()
        here = f" (this machine has {nodes})" if nodes else ""
        raise ConfigError(f"{e} (moe.ep_size); without --num_gpus the deepspeed launcher starts one process "
                          f"per GPU, and on a machine without GPUs one per NUMA node{here}: pass --num_gpus N "
                          f"with N a multiple of {moe.ep_size}, e.g. deepspeed --num_gpus {moe.ep_size} "
                          f"launch/pretrain.py ...") from None
