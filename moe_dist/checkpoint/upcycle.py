"""Sparse upcycling: a dense model (a moe_dist checkpoint, or a local dense Hugging Face Llama /
Qwen2 / Qwen3 directory) into an MoE model whose step-0 function is the dense model's
(docs/checkpoints.md, "upcycle").

Every FFN layer chosen (`moe_every`, `moe_offset`; default all) becomes an MoE layer of
E = copies * G experts, G the granularity. The dense FFN's hidden units are split into G
contiguous slices (SwiGLU: the same units of its gate and up branches); expert `c * G + s` is copy
c of slice s, as in Megatron-Core's granular upcycling. Because an FFN is a sum over its hidden
units, FFN(x) = sum_s FFN_s(x), so the MoE layer equals the dense one when every token gives each
slice total weight 1:

- the router row of expert (c, s) is row c of a random [copies, D] matrix, the same for every
  slice of a copy, so a token's logits come in G equal values per copy and its top K = m * G
  experts are m whole copies (every slice m times);
- the top-k probabilities are renormalized (they sum to 1, i.e. 1/G per slice) and multiplied by
  G: the router's `scale` (slice_scale "router"), or, where a router without that knob must be
  used, the experts' output projections times G (slice_scale "output"; the same function);
- dropless dispatch, so no chosen pair is lost to capacity.

G = 1 is plain sparse upcycling (Komatsuzaki et al.): identical experts, renormalized weights.
Attention, norms, embeddings and dense layers are copied unchanged. `expert_noise` > 0 perturbs
each expert independently (no longer exactly the dense function).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from moe_dist.checkpoint.consolidated import (ConsolidatedCheckpoint, full_state_dict, open_checkpoint,
                                              write_consolidated)
from moe_dist.checkpoint.files import SAFETENSORS, CheckpointError, check_output
from moe_dist.checkpoint.hf.importer import RUN_CONFIG_FILE, continued_run_config, portable_path
from moe_dist.checkpoint.training import read_latest
from moe_dist.common.config import ConfigError, to_dict
from moe_dist.common.seeding import init_generator
from moe_dist.model.config import ModelConfig, parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.config import MoEConfig

SLICE_SCALES = ("router", "output")
# A directory with one of these holds a Hugging Face tokenizer (moe_dist.data.config's markers;
# checkpoint does not import data).
_HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# init_generator keys of this tool's draws (per layer), apart from the model's own keys.
_ROUTER_KEY, _NOISE_KEY = -101, -102


@dataclass(frozen=True)
class UpcycleSpec:
    """What to build; checked on construction (CheckpointError naming the value)."""

    num_experts: int
    top_k: int
    granularity: int = 1
    # Std of the router rows; None: what a fresh topk router draws, 1/sqrt(d_model).
    router_std: float | None = None
    # Std of independent Gaussian noise added to each expert, relative to the std of the dense
    # weight it copies; 0 keeps step 0 exact.
    expert_noise: float = 0.0
    seed: int = 0
    moe_every: int = 1
    moe_offset: int = 0
    slice_scale: str = "router"

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise CheckpointError(message)

        for name in ("num_experts", "top_k", "granularity", "moe_every"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        E, K, G = self.num_experts, self.top_k, self.granularity
        require(E % G == 0, f"--num-experts ({E}) must be divisible by --granularity ({G}): the experts are "
                            f"copies of the {G} slices of the dense FFN")
        require(K <= E, f"--top-k ({K}) must be <= --num-experts ({E})")
        require(K % G == 0, f"--top-k ({K}) must be a multiple of --granularity ({G}): each token must choose "
                            f"whole copies of the dense FFN (every slice equally often) for step 0 to equal "
                            f"the dense model")
        require(isinstance(self.moe_offset, int) and self.moe_offset >= 0,
                f"--moe-offset must be an integer >= 0, got {self.moe_offset!r}")
        require(self.router_std is None or (isinstance(self.router_std, (int, float)) and self.router_std > 0),
                f"--router-std must be > 0, got {self.router_std!r}: equal router rows tie every copy, and "
                f"ties can split a copy's slices")
        require(isinstance(self.expert_noise, (int, float)) and self.expert_noise >= 0,
                f"--expert-noise must be >= 0, got {self.expert_noise!r}")
        require(self.slice_scale in SLICE_SCALES,
                f"--slice-scale must be one of {SLICE_SCALES}, got {self.slice_scale!r}")

    @property
    def copies(self) -> int:
        return self.num_experts // self.granularity


def router_has_scale() -> bool:
    """Whether this moe_dist's topk router has the `scale` knob (the weights' multiplier)."""
    router = MoEConfig(d_model=1, d_ff=1, num_experts=1, top_k=1).router  # the default: topk
    return any(f.name == "scale" for f in dataclasses.fields(router))


def upcycled_config(cfg: ModelConfig, spec: UpcycleSpec, where: str = "SRC") -> ModelConfig:
    """The MoE model's config: `cfg` with MoE FFNs of width d_ff / G on the chosen layers."""
    if cfg.moe is not None:
        raise CheckpointError(f"{where} is already an MoE model (moe.num_experts {cfg.moe.num_experts} on layers "
                              f"{cfg.moe_layer_indices}); upcycling needs a dense model")
    G = spec.granularity
    if cfg.d_ff % G:
        raise CheckpointError(f"model.d_ff ({cfg.d_ff}) of {where} is not divisible by --granularity ({G})")
    if spec.moe_offset >= cfg.n_layers:
        raise CheckpointError(f"--moe-offset ({spec.moe_offset}) must be < the n_layers ({cfg.n_layers}) of {where}")
    router = {"type": "topk", "renormalize": True}
    if G > 1 and spec.slice_scale == "router":
        if not router_has_scale():
            raise CheckpointError(f"--granularity {G} with --slice-scale router needs the topk router's `scale` "
                                  f"key, which this moe_dist lacks; use --slice-scale output")
        router["scale"] = float(G)
    model = to_dict(cfg)
    model.pop("moe")
    model.update(moe_every=spec.moe_every, moe_offset=spec.moe_offset)
    moe = {"d_ff": cfg.d_ff // G, "num_experts": spec.num_experts, "top_k": spec.top_k, "dropless": True,
           "activation": cfg.activation, "init_std": cfg.init_std, "router": router}
    try:
        return parse_model_config(model, moe)
    except ConfigError as e:
        raise CheckpointError(f"the upcycled config of {where} is invalid: {e}") from None


def _expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes of the model's state dict, and its buffers, without allocating it."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {n for n, _ in model.named_buffers() if n in state}


def _check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, what: str) -> None:
    shapes, _ = _expected_shapes(cfg)
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(f"{what} does not match its config: missing {missing}, unexpected {unexpected}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{what}: {name} has shape {tuple(state[name].shape)}, its config implies {shape}")


def _slices(w_in_DI: torch.Tensor, w_out_FD: torch.Tensor, activation: str,
            G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense FFN's G hidden-unit slices as experts: w_in [G, D, (2)F/G], w_out [G, F/G, D]."""
    F = w_out_FD.shape[0]
    f = F // G
    if activation == "swiglu":  # the fused [gate | up] columns: slice s takes its units of both
        gate, up = w_in_DI[:, :F], w_in_DI[:, F:]
        w_in = [torch.cat([gate[:, s * f:(s + 1) * f], up[:, s * f:(s + 1) * f]], dim=1) for s in range(G)]
    else:
        w_in = [w_in_DI[:, s * f:(s + 1) * f] for s in range(G)]
    return torch.stack(w_in), torch.stack([w_out_FD[s * f:(s + 1) * f] for s in range(G)])


def _noisy(w_stack: torch.Tensor, like: torch.Tensor, rel_std: float, g: torch.Generator) -> torch.Tensor:
    """`w_stack` (experts stacked on dim 0) plus noise of `rel_std` times the dense weight `like`'s std."""
    if rel_std == 0:
        return w_stack
    noise = torch.randn(w_stack.shape, generator=g, dtype=torch.float32) * (rel_std * like.float().std())
    return (w_stack.float() + noise).to(w_stack.dtype)


def upcycle_state(cfg: ModelConfig, state: dict[str, torch.Tensor], num_experts: int, top_k: int,
                  granularity: int = 1, *, progress: bool = False, **options) -> tuple[ModelConfig, dict]:
    """The MoE config and state dict (ep_size 1, the consolidated format's names) upcycled from
    the dense `cfg` and its `state`; `options` are the other `UpcycleSpec` fields."""
    spec = UpcycleSpec(num_experts, top_k, granularity, **options)
    moe_cfg = upcycled_config(cfg, spec)
    _check_state(state, cfg, "the dense state dict")
    G, copies, D = spec.granularity, spec.copies, cfg.d_model
    router_std = spec.router_std if spec.router_std is not None else 1.0 / math.sqrt(D)
    moe_layers = moe_cfg.moe_layer_indices
    ffn_keys = {f"blocks.{i}.ffn.{n}" for i in moe_layers for n in ("w_in_DI", "w_out_FD")}
    out = {name: t for name, t in state.items() if name not in ffn_keys}
    for i in tqdm(moe_layers, desc="upcycle", unit="layer", disable=not progress):
        w_in_DI, w_out_FD = state[f"blocks.{i}.ffn.w_in_DI"], state[f"blocks.{i}.ffn.w_out_FD"]
        w_in_slices, w_out_slices = _slices(w_in_DI, w_out_FD, cfg.activation, G)
        if spec.slice_scale == "output" and G > 1:
            w_out_slices = w_out_slices * G
        noise = init_generator(spec.seed, i, _NOISE_KEY)
        # Expert c * G + s is copy c of slice s.
        prefix = f"blocks.{i}.moe."
        out[prefix + "experts.w_in_EDI"] = _noisy(w_in_slices.repeat(copies, 1, 1).contiguous(), w_in_DI,
                                                  spec.expert_noise, noise)
        out[prefix + "experts.w_out_EFD"] = _noisy(w_out_slices.repeat(copies, 1, 1).contiguous(), w_out_FD,
                                                   spec.expert_noise, noise)
        # One router row per copy ([copies, D]), repeated for each of the copy's G slices.
        copy_rows = torch.randn(copies, D, generator=init_generator(spec.seed, i, _ROUTER_KEY)) * router_std
        out[prefix + "router.gate.weight_ED"] = copy_rows.repeat_interleave(G, dim=0)
        out[prefix + "router.selection_bias_E"] = torch.zeros(spec.num_experts)
    _check_state(out, moe_cfg, "the upcycled state dict")
    return moe_cfg, out


def buffer_names(cfg: ModelConfig) -> list[str]:
    return sorted(_expected_shapes(cfg)[1])


# ---- the command: read SRC, write OUT ------------------------------------------------------------

@dataclass(frozen=True)
class UpcycleResult:
    out: str
    source_kind: str  # "consolidated", "training" or "hf"
    moe_layers: list[int]
    num_parameters: int


def _is_hf_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not ConsolidatedCheckpoint.is_consolidated(path) and read_latest(path) is None)


def _hf_tokenizer_section(hf_dir: str) -> dict[str, Any]:
    """The HF model's own tokenizer (data.tokenizer kind hf) when the directory has one."""
    if any(os.path.isfile(os.path.join(hf_dir, m)) for m in _HF_TOKENIZER_MARKERS):
        return {"tokenizer": {"kind": "hf", "model": None, "path": os.path.abspath(hf_dir), "add_bos": False}}
    return {}


def _read_hf(src: str, spec: UpcycleSpec) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        from moe_dist.checkpoint.hf import importer as hf_import
    except ImportError:
        raise CheckpointError(f"{src!r} is a Hugging Face directory, but this moe_dist has no Hugging Face "
                              f"import (moe_dist.checkpoint.hf.importer)") from None
    peek = getattr(hf_import, "hf_model_config", None)  # config.json only: fail before the tensors
    if peek is not None:
        upcycled_config(peek(src)[1], spec, repr(src))
    cfg, state = hf_import.read_hf_model(src)
    upcycled_config(cfg, spec, repr(src))
    return cfg, state


def _run_config(moe_cfg: ModelConfig, data: dict[str, Any], src: str, out: str, num_experts: int, top_k: int,
                granularity: int, bf16: bool) -> str:
    """OUT/run_config.yaml, as import-hf writes one: training the upcycled model from OUT."""
    sections = {"model": to_dict(moe_cfg)}
    sections["moe"] = sections["model"].pop("moe")
    tokenizer = {k: v for k, v in (data.get("tokenizer") or {"kind": "byte"}).items() if v is not None}
    for key in ("model", "path"):
        if key in tokenizer:
            tokenizer[key] = portable_path(tokenizer[key])
    command = (f"python tools/convert_checkpoint.py upcycle {src} {out} --num-experts {num_experts} "
               f"--top-k {top_k}" + (f" --granularity {granularity}" if granularity != 1 else ""))
    return continued_run_config(sections, tokenizer, out, bf16, source=f"{portable_path(src)} (upcycled)",
                                command=command)


def upcycle(src: str, out: str, num_experts: int, top_k: int, granularity: int = 1, *, tag: str | None = None,
            overwrite: bool = False, progress: bool = True, **options) -> UpcycleResult:
    """Upcycle the dense model `src` (a consolidated or training moe_dist checkpoint, or a local HF
    Llama / Qwen2 / Qwen3 directory) into the consolidated MoE checkpoint `out` (staged: all or
    nothing); `options` are the other `UpcycleSpec` fields."""
    spec = UpcycleSpec(num_experts, top_k, granularity, **options)
    check_output(out, overwrite)
    if not os.path.isdir(src):
        raise CheckpointError(f"SRC {src!r} is not a directory; expected a moe_dist checkpoint (consolidated or "
                              f"training) or a Hugging Face model directory")
    if tag is None and _is_hf_dir(src):
        kind, data, recorded, step = "hf", _hf_tokenizer_section(src), None, None
        cfg, state = _read_hf(src, spec)
    else:
        ckpt = open_checkpoint(src, tag)
        kind = "consolidated" if isinstance(ckpt, ConsolidatedCheckpoint) else "training"
        cfg, recorded, step = ckpt.model_cfg, ckpt.recorded_tokenizer, ckpt.step
        where = repr(ckpt.path if kind == "consolidated" else ckpt.tag_dir)
        upcycled_config(cfg, spec, where)  # before the tensors are read: a wrong SRC fails at once
        data = {k: v for k, v in (ckpt.config.get("data") or {}).items() if k == "tokenizer"}
        state = full_state_dict(ckpt, progress=progress)
    moe_cfg, moe_state = upcycle_state(cfg, state, progress=progress, **dataclasses.asdict(spec))
    config = {"model": to_dict(moe_cfg), "data": data}
    config["moe"] = config["model"].pop("moe")
    meta = {"config": config, "step": None, "tokenizer": recorded, "weights": "upcycled", "dtype": "as saved",
            "buffers": buffer_names(moe_cfg),
            "source": {"upcycled_from": os.path.abspath(src), "kind": kind, "tag": tag, "step": step,
                       **dataclasses.asdict(spec)}}
    run = _run_config(moe_cfg, data, src, out, num_experts, top_k, granularity,
                      bf16=moe_state["embed.weight"].dtype == torch.bfloat16)
    write_consolidated(out, moe_state, meta, SAFETENSORS, overwrite, extra_files={RUN_CONFIG_FILE: run})
    return UpcycleResult(out=out, source_kind=kind, moe_layers=moe_cfg.moe_layer_indices,
                         num_parameters=sum(t.numel() for n, t in moe_state.items() if n not in meta["buffers"]))
