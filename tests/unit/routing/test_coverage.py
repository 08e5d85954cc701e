"""Every registered router is covered where a new router is easy to forget: an EP-equivalence case
(tests/distributed/test_ep_equivalence_layer.py's ROUTER_CASES), a counterpart in the Hugging Face remote code
(checkpoint/hf/remote_code/moe_dist_routers.py's ROUTERS table, without which its export cannot load) and a
custom-export case that loads that code and compares logits (tests/unit/checkpoint/test_export_hf.py's CASES).

The remote-code file and the export test are read with `ast` (the first is standalone code shipped
into exports, not importable as part of moe_dist; the second skips itself without transformers);
ROUTER_CASES is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.distributed import test_ep_equivalence_layer as test_ep_equivalence

from moe_dist.routing import registry
from moe_dist.routing.base import Router, RouterConfig

REPO = Path(__file__).resolve().parents[3]
HF_ROUTERS = REPO / "moe_dist" / "checkpoint" / "hf" / "remote_code" / "moe_dist_routers.py"
EXPORT_TEST = REPO / "tests" / "unit" / "checkpoint" / "test_export_hf.py"
DEFAULT_ROUTER = "topk"  # router_config_from_dict's type when a router mapping has none


def _assignment(path: Path, name: str) -> ast.expr:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    raise AssertionError(f"{path.relative_to(REPO)} has no top-level `{name} = ...`")


def _str_keys(d: ast.Dict) -> dict[str, ast.expr]:
    return {k.value: v for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def ep_case_router_types() -> set[str]:
    """Router types with at least one layer case in the EP equivalence test."""
    return {case["router"].get("type", DEFAULT_ROUTER) for case in test_ep_equivalence.ROUTER_CASES
            if case["layers"]}


def hf_router_types() -> set[str]:
    """The keys of the remote code's `ROUTERS = {...}` table."""
    table = _assignment(HF_ROUTERS, "ROUTERS")
    assert isinstance(table, ast.Dict), f"{HF_ROUTERS.relative_to(REPO)}: ROUTERS is not a dict literal"
    return set(_str_keys(table))


def export_case_router_types() -> set[str]:
    """Router types of the export test's CASES: each `router=` / `"router":` mapping's `type`."""
    types = set()
    for node in ast.walk(_assignment(EXPORT_TEST, "CASES")):
        routers = ([kw.value for kw in node.keywords if kw.arg == "router"] if isinstance(node, ast.Call)
                   else [_str_keys(node).get("router")] if isinstance(node, ast.Dict) else [])
        for router in routers:
            if isinstance(router, ast.Dict):
                kind = _str_keys(router).get("type")
                types.add(kind.value if isinstance(kind, ast.Constant) else DEFAULT_ROUTER)
    return types


def coverage_gaps(router_type: str) -> list[str]:
    """Where `router_type` is missing, one line per place; empty when it is covered everywhere."""
    gaps = []
    if router_type not in ep_case_router_types():
        gaps.append(f"router {router_type!r} has no case in tests/distributed/test_ep_equivalence_layer.py ROUTER_CASES")
    if router_type not in hf_router_types():
        gaps.append(f"router {router_type!r} is not in the ROUTERS table of "
                    f"{HF_ROUTERS.relative_to(REPO)} (its export would not load)")
    if router_type not in export_case_router_types():
        gaps.append(f"router {router_type!r} has no case in tests/unit/checkpoint/test_export_hf.py CASES")
    return gaps


def uncovered_routers() -> dict[str, list[str]]:
    return {t: gaps for t in registry.router_types() if (gaps := coverage_gaps(t))}


@pytest.mark.parametrize("router_type", registry.router_types())
def test_router_has_an_ep_case_and_an_export_counterpart(router_type):
    gaps = coverage_gaps(router_type)
    assert not gaps, "\n".join(gaps)


def test_the_places_checked_name_no_router_the_registry_lacks():
    """The other direction: a case or table row for a removed or misspelled router type."""
    known = set(registry.router_types())
    assert ep_case_router_types() <= known
    assert hf_router_types() <= known
    assert export_case_router_types() <= known


@dataclass
class _ProbeConfig(RouterConfig):
    type: str = "coverage_probe"


class _ProbeRouter(Router):
    pass


@pytest.fixture
def probe_router():
    """`coverage_probe` registered through `register_router`; the registry is restored afterwards."""
    saved = dict(registry._REGISTRY)
    registry.register_router("coverage_probe", _ProbeConfig, _ProbeRouter)
    try:
        yield "coverage_probe"
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def test_a_new_router_without_cases_is_reported_missing_everywhere(probe_router):
    assert probe_router in registry.router_types()
    gaps = uncovered_routers()
    assert list(gaps) == [probe_router]  # and the built-in routers stay covered
    assert len(gaps[probe_router]) == 3
    assert "ROUTER_CASES" in gaps[probe_router][0]
    assert "ROUTERS table" in gaps[probe_router][1]
    assert "tests/unit/checkpoint/test_export_hf.py CASES" in gaps[probe_router][2]


def test_the_registry_is_restored_after_the_probe():
    assert "coverage_probe" not in registry.router_types()
    assert set(registry.router_types()) == set(registry.BUILTIN_ROUTERS)
