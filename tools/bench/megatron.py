"""Megatron-Core's MoE layer as a case of tools/bench/moe.py.

Built as Megatron's GPT layer specs build it (`get_moe_module_spec`): `MoELayer` with its top-k
router (softmax, aux loss 0.01), the `alltoall` token dispatcher at EP=1 (gpu_check's ep part:
EP = its number of processes) and no tensor
parallelism, bias-free GELU experts of the same widths, the same capacity factor with drops
(`moe_expert_capacity_factor`, no padding). Weights are Megatron's own random init (routing is not
compared with moe_dist's; the work per token is the same: top-k of E).

Its expert MLP is the fastest one this installation can build, tried in this order:
  TEGroupedMLP   Transformer Engine's grouped GEMM (the TE spec), where transformer_engine imports;
  GroupedMLP     the legacy grouped GEMM of the `grouped_gemm` package, where that package imports
                 and this megatron-core still has it (removed in 0.17);
  SequentialMLP  one Linear pair per expert, always.
A candidate whose spec resolves to another class, or whose layer fails to build, gives way to the
next, and the reason is kept (`MegatronLayer.notes`); the row names the class that ran.

The spec helpers changed shape across versions (0.16 takes `moe_use_legacy_grouped_gemm` and
returns a `ModuleSpec`; 0.17 dropped the argument; 0.18 returns a `functools.partial` builder), so
arguments and the result are feature-detected, not keyed on a version number.

Megatron-Core's dispatcher creates CUDA streams when it is built, so on CPU every candidate fails
to build and the benchmark reports the case as skipped with that reason: the same path a GPU run
takes when a reference cannot be built.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .layers import init_single_process_dist
from .timing import first_line


class Unavailable(RuntimeError):
    """No expert MLP of Megatron-Core could be built here; the message says why for each."""


@dataclass(frozen=True)
class Candidate:
    expert_class: str  # what the spec must resolve to
    use_te: bool
    grouped_gemm: bool
    legacy: bool
    needs: str | None  # the module that must import, if any


CANDIDATES = (Candidate("TEGroupedMLP", use_te=True, grouped_gemm=True, legacy=False, needs="transformer_engine"),
              Candidate("GroupedMLP", use_te=False, grouped_gemm=True, legacy=True, needs="grouped_gemm"),
              Candidate("SequentialMLP", use_te=False, grouped_gemm=False, legacy=False, needs=None))


@dataclass
class MegatronLayer:
    layer: torch.nn.Module
    expert_class: str
    version: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """What the row reports, e.g. "megatron-core 0.16.1 SequentialMLP"."""
        return f"megatron-core {self.version} {self.expert_class}"


def megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "?")


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def moe_spec(candidate: Candidate, num_experts: int):
    """Megatron's MoE spec for `candidate`: a `ModuleSpec` (<= 0.17) or a builder (>= 0.18)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    kwargs = dict(use_te=candidate.use_te, num_experts=num_experts, moe_grouped_gemm=candidate.grouped_gemm)
    if _accepts(get_moe_module_spec, "moe_use_legacy_grouped_gemm"):
        kwargs["moe_use_legacy_grouped_gemm"] = candidate.legacy
    elif candidate.legacy:
        raise Unavailable("this megatron-core has no legacy GroupedMLP (get_moe_module_spec takes no "
                          "moe_use_legacy_grouped_gemm)")
    return get_moe_module_spec(**kwargs)


def _class_of(builder) -> type | None:
    """The class a spec entry builds: a ModuleSpec's module, a partial's function, or a class."""
    if isinstance(builder, functools.partial):
        return _class_of(builder.func)
    if isinstance(builder, type):
        return builder
    module = getattr(builder, "module", None)
    return module if isinstance(module, type) else None


def spec_submodules(spec):
    """The `MoESubmodules` of a spec from `moe_spec`, whichever shape it has."""
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def spec_expert_class(spec) -> str:
    cls = _class_of(spec_submodules(spec).experts)
    return cls.__name__ if cls is not None else repr(spec_submodules(spec).experts)


def build_layer_from_spec(spec, config):
    if isinstance(spec, functools.partial):
        return spec(config=config)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, config=config)


def transformer_config(spec, dtype: torch.dtype, candidate: Candidate):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1, hidden_size=spec.d_model, num_attention_heads=8, ffn_hidden_size=spec.d_ff,
        moe_ffn_hidden_size=spec.d_ff, num_moe_experts=spec.num_experts, moe_router_topk=spec.top_k,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=candidate.grouped_gemm,
        moe_expert_capacity_factor=spec.capacity_factor, moe_pad_expert_input_to_capacity=False,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        activation_func=F.gelu, gated_linear_unit=False, add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=spec.device != "cuda")
    if "moe_use_legacy_grouped_gemm" in {f.name for f in dataclasses.fields(TransformerConfig)}:
        kwargs["moe_use_legacy_grouped_gemm"] = candidate.legacy
    return TransformerConfig(**kwargs)


def _init_parallel_state(seed: int, ep_size: int) -> None:
    """Megatron's model-parallel state over the process group the benchmark already started
    (collective: every rank calls it)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=ep_size)
    elif parallel_state.get_expert_model_parallel_world_size() != ep_size:
        raise Unavailable(f"Megatron-Core's parallel state exists with expert parallelism "
                          f"{parallel_state.get_expert_model_parallel_world_size()}, not {ep_size}")
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:  # its CUDA seeding asserts a CUDA build; CPU init draws from torch's generator
        torch.manual_seed(seed)


def build_megatron_layer(spec, dtype: torch.dtype, have: Callable[[str], bool] | None = None,
                         ep_size: int = 1) -> MegatronLayer:
    """Megatron-Core's MoELayer for `spec` (tools/bench/spec.py) with the fastest expert MLP that
    builds here, in the process group that exists (else a one-process one), its experts spread over
    `ep_size` ranks (every rank of the group calls this). Raises `Unavailable` naming why each
    candidate failed. `have(module)`: whether a module imports (tests substitute it)."""
    have = have or (lambda name: importlib.util.find_spec(name) is not None)
    init_single_process_dist()
    _init_parallel_state(spec.seed, ep_size)
    notes = []
    for cand in CANDIDATES:
        if cand.needs is not None and not have(cand.needs):
            notes.append(f"{cand.expert_class}: {cand.needs} is not installed")
            continue
        try:
            moe = moe_spec(cand, spec.num_experts)
            resolved = spec_expert_class(moe)
            if resolved != cand.expert_class:
                notes.append(f"{cand.expert_class}: the spec builds {resolved} instead")
                continue
            layer = build_layer_from_spec(moe, transformer_config(spec, dtype, cand))
        except Exception as e:  # each candidate's failure is kept; the next one is tried
            notes.append(f"{cand.expert_class}: {first_line(e)}")
            continue
        built = type(layer.experts).__name__
        return MegatronLayer(layer.to(device=spec.device, dtype=dtype), built, megatron_version(), notes)
    raise Unavailable(f"megatron-core {megatron_version()}: no expert MLP builds here ({'; '.join(notes)})")


def make_megatron_step(layer, spec, make_inputs: Callable) -> Callable[[], None]:
    """One forward+backward; Megatron takes [sequence, batch, hidden] (one sequence of T tokens).
    Its aux loss is attached to the output by its autograd hook, so one backward covers it."""
    x, grad_y = make_inputs(spec, spec.tokens)
    x3, g3 = x.detach().view(spec.tokens, 1, spec.d_model).requires_grad_(), grad_y.view(spec.tokens, 1, -1)

    def step() -> None:
        y, _bias = layer(x3)
        y.backward(g3)
        layer.zero_grad(set_to_none=True)
        x3.grad = None

    return step
