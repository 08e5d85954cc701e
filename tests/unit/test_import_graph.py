"""Imports flow one way between moe_dist's packages (docs/design.md, "Packages and the direction of
imports"), checked on the source with `ast` alone (tests/harness/import_graph.py reads every import at any
depth, relative ones resolved, and literal import_module calls): nothing of the library is
imported, so the test runs in well under a second and also on a tree whose imports are broken.
A module belongs to its top-level package: `moe_dist/moe/layer.py` is `moe`; a file directly under `moe_dist/` is a
package of its own and must be in LAYERS like any other. Between modules too there is no circle
(`module_cycles`): an import inside a function still ties the two files together.

`MOE_DIST_GRAPH_ROOT=/some/checkout pytest tests/unit/test_import_graph.py` checks another tree (one
with `moe_dist/` and `docs/design.md` in it); `violations(root)` returns every rule's findings.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from tests.harness.import_graph import (Import, all_imports, cycle_report, file_package, imports_of, is_distributed,
                                        library_files, module_edges, module_name, package_edges, package_of, parsed,
                                        segment)

# The layering, lowest first: a package may import only packages listed before it.
LAYERS = ["common", "kernels", "parallel", "routing", "moe", "model", "data", "checkpoint", "evaluate", "train", "study"]
# Narrower than the order: all that each of these may import (besides itself).
ALLOWED_ONLY = {"data": {"common"}, "checkpoint": {"common", "parallel", "moe", "model"}}
# The model math: plain single-process PyTorch; communication goes through `parallel`.
MODEL_MATH = ["common", "kernels", "routing", "moe", "model"]
# The only package that may import torch.distributed.
DISTRIBUTED_PACKAGES = {"parallel"}
# Shipped into Hugging Face exports and loaded where moe_dist is not installed.
STANDALONE_DIRS = ["checkpoint/hf/remote_code"]
# Inside a package: its parts (sub-packages and modules directly under it), lowest first; a part
# imports only parts listed before it. The package's own __init__.py may import any of them.
PARTS = {
    "checkpoint": ["files", "training", "consolidated", "hf", "upcycle", "inspect", "cli"],
    "train": ["config", "ds_config", "schedule", "progress", "flops", "memory_plan", "moe_metrics", "sink", "tb_logger",
              "trackers", "metrics_log", "run_record", "tracing", "safety", "preflight", "engine", "trainer"],
}
# The training-checkpoint format has one home: outside it, only the package's own names are used
# (its __init__.py), never its modules; library, tools and launch scripts alike.
FORMAT_PACKAGE = "moe_dist.checkpoint.training"
SCRIPT_DIRS = ["tools", "launch"]
MAX_LINES = 400
DESIGN_SECTION = "Packages and the direction of imports"

REPO = Path(__file__).resolve().parents[2]


def root() -> Path:
    return Path(os.environ.get("MOE_DIST_GRAPH_ROOT", REPO)).resolve()


# ---- the rules: each returns its findings, one line per offending import ----------------------


def unlisted_packages(base: Path) -> list[str]:
    found = {}
    for path in library_files(base):
        rel = path.relative_to(base).as_posix()
        pkg = file_package(rel)
        if pkg == "moe_dist":
            continue  # the root's own __init__.py, if any: root_init_imports
        if pkg not in LAYERS:
            found.setdefault(pkg, rel)
    return [f"{rel}: package {pkg!r} is not in the layering {LAYERS} (add it to LAYERS and "
            f"docs/design.md, or move the file into a package)" for pkg, rel in sorted(found.items())]


def root_init_imports(base: Path) -> list[str]:
    """moe_dist/__init__.py runs on every import of the library: it may import none of it."""
    return [f"{imp}: moe_dist/__init__.py runs for every import of moe_dist and must not import "
            f"{imp.target}" for imp in all_imports(base)
            if imp.file == "moe_dist/__init__.py" and package_of(imp.target) not in (None, "moe_dist")]


def package_cycles(base: Path) -> list[str]:
    graph: dict[str, dict[str, Import]] = {}
    for src, dst, imp in package_edges(base):
        graph.setdefault(src, {}).setdefault(dst, imp)
    return cycle_report("packages", graph)


def module_cycles(base: Path) -> list[str]:
    graph: dict[str, dict[str, Import]] = {}
    for src, dst, imp in module_edges(base):
        graph.setdefault(src, {}).setdefault(dst, imp)
    return cycle_report("modules", graph)


def upward_imports(base: Path) -> list[str]:
    """A package imports only packages below it (and, for ALLOWED_ONLY, only those listed)."""
    found = []
    for src, dst, imp in package_edges(base):
        if src not in LAYERS or dst not in LAYERS:
            continue  # unlisted_packages names these
        if LAYERS.index(dst) > LAYERS.index(src):
            found.append(f"{imp}: {src} imports {dst}, which is above it ({' < '.join(LAYERS)})")
        elif src in ALLOWED_ONLY and dst not in ALLOWED_ONLY[src]:
            found.append(f"{imp}: {src} may import only {sorted(ALLOWED_ONLY[src])}, not {dst}")
    return found


def routing_imports_moe(base: Path) -> list[str]:
    return [f"{imp}: routing must never import moe (routers are pure functions the MoE layer calls)"
            for src, dst, imp in package_edges(base) if (src, dst) == ("routing", "moe")]


def checkpoint_imports_train(base: Path) -> list[str]:
    return [f"{imp}: checkpoint must never import train (train imports checkpoint)"
            for src, dst, imp in package_edges(base) if (src, dst) == ("checkpoint", "train")]


def library_imports_study(base: Path) -> list[str]:
    return [f"{imp}: only study itself (and tools/tests) may import study; {src} does"
            for src, dst, imp in package_edges(base) if dst == "study"]


def lower_imports_upper(base: Path) -> list[str]:
    lower, upper = LAYERS[: LAYERS.index("model") + 1], {"data", "checkpoint", "train", "study"}
    return [f"{imp}: {src} is below data/checkpoint/train/study and must not import {dst}"
            for src, dst, imp in package_edges(base) if src in lower and dst in upper]


def distributed_imports(base: Path) -> list[str]:
    found = []
    for imp in all_imports(base):
        pkg = file_package(imp.file)
        if is_distributed(imp.target) and pkg not in DISTRIBUTED_PACKAGES:
            kind = "model math " if pkg in MODEL_MATH else ""
            found.append(f"{imp}: {kind}package {pkg} imports torch.distributed; only "
                         f"{sorted(DISTRIBUTED_PACKAGES)} may (call moe_dist.parallel instead)")
    return found


def distributed_attributes(base: Path) -> list[str]:
    """`torch.distributed.x` reached through a plain `import torch`, outside DISTRIBUTED_PACKAGES."""
    found = []
    for path in library_files(base):
        rel = path.relative_to(base).as_posix()
        if file_package(rel) in DISTRIBUTED_PACKAGES:
            continue
        lines, tree = parsed(path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "distributed"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                found.append(f"{rel}:{node.lineno}: {segment(lines, node)}: only "
                             f"{sorted(DISTRIBUTED_PACKAGES)} may use torch.distributed")
    return found


def standalone_imports(base: Path) -> list[str]:
    """Files shipped into exports import nothing of moe_dist (relative imports of each other are fine)."""
    found = []
    for folder in STANDALONE_DIRS:
        own = "moe_dist." + folder.replace("/", ".")
        for imp in all_imports(base):
            if (imp.file.startswith(f"moe_dist/{folder}/") and package_of(imp.target) is not None
                    and imp.target != own and not imp.target.startswith(own + ".")):
                found.append(f"{imp}: moe_dist/{folder}/ is copied into Hugging Face exports and loaded "
                             f"without moe_dist; it must not import {imp.target}")
    return found


def long_files(base: Path) -> list[str]:
    found = []
    for path in library_files(base):
        n = len(parsed(path)[0])
        if n > MAX_LINES:
            found.append(f"{path.relative_to(base).as_posix()}: {n} lines (the limit is {MAX_LINES})")
    return found


def part_of(module: str) -> tuple[str, str] | None:
    """`moe_dist.checkpoint.training.writer` -> ('checkpoint', 'training'); None for a package's own
    __init__ and for packages without PARTS."""
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "moe_dist" or parts[1] not in PARTS:
        return None
    return parts[1], parts[2]


def unlisted_parts(base: Path) -> list[str]:
    found = {}
    for path in library_files(base):
        where = part_of(module_name(base, path))
        if where is not None and where[1] not in PARTS[where[0]]:
            found.setdefault(where, path.relative_to(base).as_posix())
    return [f"{rel}: {pkg}/{part} is not in PARTS[{pkg!r}] (place it in the order there and in docs/design.md)"
            for (pkg, part), rel in sorted(found.items())]


def upward_part_imports(base: Path) -> list[str]:
    """Inside a package with PARTS, a part imports only parts listed before it."""
    found = []
    for src, dst, imp in module_edges(base):
        a, b = part_of(src), part_of(dst)
        if a is None or b is None or a[0] != b[0] or a[1] == b[1]:
            continue
        order = PARTS[a[0]]
        if a[1] in order and b[1] in order and order.index(b[1]) > order.index(a[1]):
            found.append(f"{imp}: {a[0]}/{a[1]} imports {a[0]}/{b[1]}, which is above it ({' < '.join(order)})")
    return found


def format_imported_around_its_package(base: Path) -> list[str]:
    """Outside checkpoint/training/, the training format is reached through the package's names."""
    files = library_files(base) + [p for d in SCRIPT_DIRS for p in sorted((base / d).rglob("*.py"))]
    inside = "moe_dist/" + FORMAT_PACKAGE.removeprefix("moe_dist.").replace(".", "/") + "/"
    return [f"{imp}: use `from {FORMAT_PACKAGE} import ...` (its __init__.py is the format's interface), not "
            f"{imp.target}" for path in files for imp in imports_of(base, path)
            if not imp.file.startswith(inside) and imp.target.startswith(FORMAT_PACKAGE + ".")]


RULES = [unlisted_packages, root_init_imports, package_cycles, module_cycles, upward_imports, routing_imports_moe,
         checkpoint_imports_train, unlisted_parts, upward_part_imports, format_imported_around_its_package, library_imports_study, lower_imports_upper, distributed_imports,
         distributed_attributes, standalone_imports, long_files]


def violations(base: Path | None = None) -> dict[str, list[str]]:
    base = root() if base is None else Path(base)
    return {rule.__name__: found for rule in RULES if (found := rule(base))}


def design_layers(base: Path) -> list[str]:
    """The packages in design.md's section, in the order it lists them: lines `N. \\`name\\` ...`."""
    text = (base / "docs" / "design.md").read_text()
    match = re.search(rf"^## {re.escape(DESIGN_SECTION)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/design.md has no section '## {DESIGN_SECTION}'"
    return re.findall(r"^\d+\. `(\w+)`", match.group(1), re.M)


# ---- tests ----------------------------------------------------------------------------------


def test_the_tree_has_a_library():
    assert library_files(root()), f"no moe_dist/**/*.py under {root()}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule(rule):
    found = rule(root())
    assert not found, f"{rule.__name__} ({len(found)}):\n" + "\n".join(found)


def test_design_doc_states_the_same_layering():
    assert design_layers(root()) == LAYERS, (
        f"docs/design.md '{DESIGN_SECTION}' lists {design_layers(root())}, the test enforces {LAYERS}")
    for pkg, allowed in ALLOWED_ONLY.items():  # the narrower lists stay inside the order
        assert allowed <= set(LAYERS[: LAYERS.index(pkg)]), (pkg, allowed)


def write_tree(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)


def test_resolution_of_relative_and_aliased_imports(tmp_path):
    """The parser itself, on a small tree: relative imports, `from moe_dist import pkg`, imports in
    functions, import_module, and torch.distributed in its three spellings."""
    files = {
        "moe_dist/routing/__init__.py": "",
        "moe_dist/routing/a.py": "def f():\n    from ..moe import layer\n",
        "moe_dist/routing/b.py": "from . import a\nfrom .a import f\n",
        "moe_dist/moe/__init__.py": "from moe_dist import train\n",
        "moe_dist/moe/layer.py": "import torch\nfrom torch import distributed\nx = torch.distributed.is_initialized\n",
        "moe_dist/model/m.py": "import importlib\nimportlib.import_module('moe_dist.study.x')\nimport torch.distributed as d\n",
        "moe_dist/stray.py": "",
        "moe_dist/checkpoint/hf/remote_code/modeling.py": "from .configuration import C\nimport moe_dist.model.m\n",
    }
    write_tree(tmp_path, files)
    found = violations(tmp_path)
    assert [line.split(":")[:2] for line in found["routing_imports_moe"]] == [["moe_dist/routing/a.py", "2"]]
    assert sorted(line.split(":")[0] for line in found["lower_imports_upper"]) == ["moe_dist/model/m.py",
                                                                                   "moe_dist/moe/__init__.py"]
    assert [line.split(":")[:2] for line in found["library_imports_study"]] == [["moe_dist/model/m.py", "2"]]
    assert {line.split(":")[0] for line in found["distributed_imports"]} == {"moe_dist/moe/layer.py",
                                                                             "moe_dist/model/m.py"}
    assert found["distributed_attributes"][0].startswith("moe_dist/moe/layer.py:3:")
    assert "'stray'" in found["unlisted_packages"][0]
    assert len(found["standalone_imports"]) == 1 and "moe_dist.model.m" in found["standalone_imports"][0]
    assert "package_cycles" not in found and "checkpoint_imports_train" not in found
    (tmp_path / "moe_dist/moe/back.py").write_text("from ..routing import b\n")
    cycles = violations(tmp_path)["package_cycles"]
    assert len(cycles) == 1 and "['moe', 'routing']" in cycles[0] and "moe_dist/moe/back.py:1:" in cycles[0]


def test_module_cycles_count_imports_inside_functions(tmp_path):
    """The circle data/tokenizer.py and data/hf_tokenizer.py once made (the factory imported the
    subclass lazily, the subclass imported the factory's module for its base), and what is no circle:
    a package's `__init__.py` re-exporting its submodules, and submodules importing each other one way."""
    files = {
        "moe_dist/data/__init__.py": "",
        "moe_dist/data/tokenizer.py": "class Base:\n    pass\n\n\ndef build():\n"
                                      "    from moe_dist.data.hf_tokenizer import HF\n    return HF()\n",
        "moe_dist/data/hf_tokenizer.py": "from moe_dist.data.tokenizer import Base\n\n\nclass HF(Base):\n    pass\n",
        "moe_dist/data/tokenizers/__init__.py": "from .base import Base\nfrom moe_dist.data.tokenizers.build import build\n",
        "moe_dist/data/tokenizers/base.py": "class Base:\n    pass\n",
        "moe_dist/data/tokenizers/hf.py": "from moe_dist.data.tokenizers.base import Base\n",
        "moe_dist/data/tokenizers/build.py": "from moe_dist.data.tokenizers import hf\n",
    }
    write_tree(tmp_path, files)
    edges = {(src, dst) for src, dst, _ in module_edges(tmp_path)}
    assert ("moe_dist.data.tokenizers.build", "moe_dist.data.tokenizers.hf") in edges  # `from pkg import module`
    assert ("moe_dist.data.tokenizers", "moe_dist.data.tokenizers.base") in edges  # relative
    cycles = violations(tmp_path)["module_cycles"]
    assert len(cycles) == 1 and "['moe_dist.data.hf_tokenizer', 'moe_dist.data.tokenizer']" in cycles[0]
    assert "moe_dist/data/tokenizer.py:6: from moe_dist.data.hf_tokenizer import HF" in cycles[0]
    assert "moe_dist/data/hf_tokenizer.py:1: from moe_dist.data.tokenizer import Base" in cycles[0]
    assert "package_cycles" not in violations(tmp_path)
    # a submodule importing its package back, whose __init__.py imports it: a circle
    (tmp_path / "moe_dist/data/tokenizers/hf.py").write_text("from moe_dist.data.tokenizers import Base\n")
    (tmp_path / "moe_dist/data/tokenizers/build.py").write_text("def build():\n    from . import hf\n")
    cycles = violations(tmp_path)["module_cycles"]
    assert len(cycles) == 2 and any("moe_dist.data.tokenizers.build -> moe_dist.data.tokenizers.hf" in c
                                    for c in cycles)


def test_parts_and_the_format_boundary(tmp_path):
    """Inside checkpoint/ and train/ imports flow up PARTS; the training format is used through its
    package's names, from the library and from tools/ and launch/ alike."""
    write_tree(tmp_path, {
        "moe_dist/checkpoint/__init__.py": "from moe_dist.checkpoint.cli import main\n",
        "moe_dist/checkpoint/files.py": "",
        "moe_dist/checkpoint/training/__init__.py": "from .writer import save\n",
        "moe_dist/checkpoint/training/writer.py": "from moe_dist.checkpoint.files import x\n",
        "moe_dist/checkpoint/training/tags.py": "def f():\n    from moe_dist.checkpoint import consolidated\n",
        "moe_dist/checkpoint/consolidated.py": "from moe_dist.checkpoint.training import save\n",
        "moe_dist/checkpoint/cli.py": "from moe_dist.checkpoint.training.tags import f\n",
        "moe_dist/checkpoint/stray.py": "",
        "moe_dist/train/__init__.py": "",
        "moe_dist/train/trainer.py": "from moe_dist.checkpoint.training import save\n",
        "moe_dist/train/safety/lock.py": "from moe_dist.train.preflight import checks\n",
        "moe_dist/train/preflight/checks.py": "from moe_dist.train.safety import lock\n",
        "tools/convert.py": "from moe_dist.checkpoint.training.writer import save\n",
    })
    found = violations(tmp_path)
    assert sorted(line.split(":")[0] for line in found["upward_part_imports"]) == [
        "moe_dist/checkpoint/training/tags.py", "moe_dist/train/safety/lock.py"]
    assert sorted(line.split(":")[0] for line in found["format_imported_around_its_package"]) == [
        "moe_dist/checkpoint/cli.py", "tools/convert.py"]
    assert len(found["unlisted_parts"]) == 1 and "checkpoint/stray" in found["unlisted_parts"][0]


def test_design_map_names_every_package():
    """The map at the top of docs/design.md names every package and sub-package of the tree, and
    nothing that is gone."""
    base = root()
    text = (base / "docs" / "design.md").read_text()
    block = re.search(r"^## The packages at a glance\n+```\n(.*?)```", text, re.M | re.S)
    assert block, "docs/design.md has no '## The packages at a glance' block"
    mapped, stack = set(), []
    for line in block.group(1).splitlines():
        names = []  # a line starts with its folder, then that folder's sub-folders: `data/  tokenizers/`
        for token in line.split():
            if not token.endswith("/"):
                break
            names.append(token.rstrip("/"))
        if names:
            stack = stack[: (len(line) - len(line.lstrip())) // 2] + [names[0]]
            mapped.update(["/".join(stack)] + ["/".join(stack + [n]) for n in names[1:]])
    packages = {p.parent.relative_to(base).as_posix() for p in (base / "moe_dist").rglob("__init__.py")}
    packages.discard("moe_dist")
    assert packages <= mapped, f"docs/design.md's map lacks {sorted(packages - mapped)}"
    stale = {m for m in mapped if m.startswith("moe_dist/") and m not in packages}
    assert not stale, f"docs/design.md's map names packages that do not exist: {sorted(stale)}"
