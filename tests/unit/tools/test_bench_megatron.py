"""tools/bench/megatron.py: the expert MLP Megatron-Core's comparison builds.

The spec helpers of the installed megatron-core (0.16) and of a stand-in with 0.18's shape (no
`moe_use_legacy_grouped_gemm`, a `functools.partial` builder instead of a `ModuleSpec`) resolve to
the class the candidate asks for; the order TEGroupedMLP, GroupedMLP, SequentialMLP follows what
is installed; a candidate whose spec resolves to another class (0.16's TE spec without a TE that
has grouped linears gives the legacy GroupedMLP, which asserts `grouped_gemm`) or fails to build
gives way to the next, with the reason kept. Megatron's layer itself builds only on CUDA, so the
build is substituted here; gpu_check --quick runs the real one (tests/unit/tools/test_gpu_check.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.models.gpt import moe_module_specs  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402

from tools.bench import megatron  # noqa: E402
from tools.bench.spec import Spec  # noqa: E402

SPEC = Spec(tokens=16, d_model=32, d_ff=64, num_experts=4, top_k=2, capacity_factor=1.25, threads=1)
BY_NAME = {c.expert_class: c for c in megatron.CANDIDATES}


def test_installed_spec_resolves_each_local_candidate_to_its_class():
    assert megatron.spec_expert_class(megatron.moe_spec(BY_NAME["SequentialMLP"], 4)) == "SequentialMLP"
    assert megatron.spec_expert_class(megatron.moe_spec(BY_NAME["GroupedMLP"], 4)) == "GroupedMLP"


def spec_0_18(use_te=True, num_experts=None, moe_grouped_gemm=False):
    """get_moe_module_spec as megatron-core >= 0.17 has it: no legacy argument; 0.18 returns a builder."""
    experts = functools.partial(SequentialMLP, submodules=None)
    return functools.partial(MoELayer, submodules=MoESubmodules(experts=experts))


def test_newer_spec_signature_and_shape_are_detected(monkeypatch):
    monkeypatch.setattr(moe_module_specs, "get_moe_module_spec", spec_0_18)
    spec = megatron.moe_spec(BY_NAME["SequentialMLP"], 4)  # today's code passed the legacy argument: TypeError
    assert isinstance(spec, functools.partial)
    assert megatron.spec_expert_class(spec) == "SequentialMLP"
    with pytest.raises(megatron.Unavailable, match="no legacy GroupedMLP"):
        megatron.moe_spec(BY_NAME["GroupedMLP"], 4)


class FakeLayer(torch.nn.Module):
    """What `build_layer_from_spec` returns in these tests: a module whose `experts` is an
    instance of the class the spec names (Megatron's real layer needs CUDA to build)."""

    def __init__(self, expert_class: str) -> None:
        super().__init__()
        self.experts = type(expert_class, (torch.nn.Module,), {})()


def build_with(monkeypatch, installed: set[str], fail: dict[str, Exception] | None = None):
    fail = fail or {}
    monkeypatch.setattr(megatron, "init_single_process_dist", lambda: None)
    monkeypatch.setattr(megatron, "_init_parallel_state", lambda seed, ep_size: None)

    def fake_build(spec, config):
        name = megatron.spec_expert_class(spec)
        if name in fail:
            raise fail[name]
        return FakeLayer(name)

    monkeypatch.setattr(megatron, "build_layer_from_spec", fake_build)
    return megatron.build_megatron_layer(SPEC, torch.float32, have=lambda module: module in installed)


def test_nothing_extra_installed_runs_sequential_mlp_and_says_why(monkeypatch):
    built = build_with(monkeypatch, installed=set())
    assert built.expert_class == "SequentialMLP"
    assert built.label == f"megatron-core {megatron.megatron_version()} SequentialMLP"
    assert built.notes == ["TEGroupedMLP: transformer_engine is not installed",
                           "GroupedMLP: grouped_gemm is not installed"]


def test_grouped_gemm_installed_runs_the_legacy_grouped_mlp(monkeypatch):
    built = build_with(monkeypatch, installed={"grouped_gemm"})
    assert built.expert_class == "GroupedMLP"


def test_te_spec_that_resolves_to_legacy_grouped_mlp_is_not_taken_for_te(monkeypatch):
    # 0.16's TE spec gives GroupedMLP where TE has no grouped linears (here: TE absent, claimed
    # present): the old code built it and died on grouped_gemm's assertion.
    built = build_with(monkeypatch, installed={"transformer_engine"})
    assert built.expert_class == "SequentialMLP"
    assert built.notes[0] == "TEGroupedMLP: the spec builds GroupedMLP instead"


def test_a_candidate_that_fails_to_build_gives_way_with_its_reason(monkeypatch):
    err = AssertionError("Grouped GEMM is not available. Please run `pip install grouped_gemm`.\nmore")
    built = build_with(monkeypatch, installed={"grouped_gemm"}, fail={"GroupedMLP": err})
    assert built.expert_class == "SequentialMLP"
    assert built.notes[-1] == ("GroupedMLP: AssertionError: Grouped GEMM is not available. "
                               "Please run `pip install grouped_gemm`.")


def test_no_candidate_builds_raises_unavailable_naming_each(monkeypatch):
    with pytest.raises(megatron.Unavailable) as info:
        build_with(monkeypatch, installed=set(),
                   fail={"SequentialMLP": RuntimeError("torch.cuda.Stream requires CUDA")})
    msg = str(info.value)
    assert "transformer_engine is not installed" in msg and "grouped_gemm is not installed" in msg
    assert "SequentialMLP: RuntimeError: torch.cuda.Stream requires CUDA" in msg


def test_transformer_config_sets_the_legacy_flag_only_where_the_field_exists():
    cfg = megatron.transformer_config(SPEC, torch.float32, BY_NAME["GroupedMLP"])
    assert (cfg.moe_grouped_gemm, cfg.num_moe_experts, cfg.moe_router_topk) == (True, 4, 2)
    assert cfg.moe_use_legacy_grouped_gemm is True
    assert isinstance(megatron.megatron_version(), str)
