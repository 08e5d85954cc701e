"""No Python file of the repository edits `sys.path`: the library is an installed package, the
benchmarks are the package `tools.bench` run as modules from the repository root, and the tests
reach both by their names (pytest's `pythonpath` setting in pyproject.toml puts the root first).
An edit would make which tree a module comes from depend on the caller.

Checked on the source with `ast` alone, like tests/unit/test_import_graph.py: any call of a mutating
method of `sys.path` (`sys.path.insert(...)`, also as `from sys import path` or `import sys as s`),
any assignment to it or to an item or slice of it, `+=` on it, and `site.addsitedir(...)`.
`MOE_DIST_GRAPH_ROOT=/some/checkout pytest tests/unit/test_no_sys_path.py` checks another tree.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

FOLDERS = ("moe_dist", "tools", "tests", "launch")
MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "reverse", "sort", "__setitem__",
            "__delitem__", "__iadd__"}


def root() -> Path:
    return Path(os.environ.get("MOE_DIST_GRAPH_ROOT", Path(__file__).resolve().parents[2])).resolve()


class _Finder(ast.NodeVisitor):
    def __init__(self) -> None:
        self.sys_names: set[str] = set()  # names bound to the sys module
        self.path_names: set[str] = set()  # names bound to sys.path itself
        self.site_names: set[str] = set()  # names bound to the site module
        self.lines: list[int] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "sys":
                self.sys_names.add(alias.asname or "sys")
            elif alias.name == "site":
                self.site_names.add(alias.asname or "site")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "sys":
            self.path_names.update(a.asname or a.name for a in node.names if a.name == "path")
        elif node.module == "site":
            self.lines += [node.lineno for a in node.names if a.name == "addsitedir"]

    def is_path(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.path_names
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id in self.sys_names)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            if func.attr in MUTATORS and self.is_path(func.value):
                self.lines.append(node.lineno)
            elif func.attr == "addsitedir" and isinstance(func.value, ast.Name) \
                    and func.value.id in self.site_names:
                self.lines.append(node.lineno)
        self.generic_visit(node)

    def _targets(self, targets: list[ast.expr], lineno: int) -> None:
        for target in targets:
            for node in ast.walk(target):
                base = node.value if isinstance(node, ast.Subscript) else node
                if self.is_path(base):
                    self.lines.append(lineno)
                    break

    def visit_Assign(self, node: ast.Assign) -> None:
        self._targets(node.targets, node.lineno)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._targets([node.target], node.lineno)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._targets([node.target], node.lineno)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        self._targets(node.targets, node.lineno)
        self.generic_visit(node)


def sys_path_edits(base: Path) -> list[str]:
    """`file:line: source` of every `sys.path` edit under FOLDERS of `base`."""
    found = []
    for folder in FOLDERS:
        for path in sorted((base / folder).rglob("*.py")):
            source = path.read_text()
            finder = _Finder()
            # Imports bind names before their uses in the file; the first pass collects them.
            tree = ast.parse(source, filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    finder.visit(node)
            finder.lines = []
            finder.visit(tree)
            lines = source.splitlines()
            found += [f"{path.relative_to(base)}:{n}: {lines[n - 1].strip()}"
                      for n in sorted(set(finder.lines))]
    return found


def test_no_file_edits_sys_path():
    edits = sys_path_edits(root())
    if edits:
        pytest.fail("sys.path is edited (import the module by its package name instead, and run tools as "
                    "`python -m tools.bench.<name>` from the repository root):\n" + "\n".join(edits),
                    pytrace=False)


@pytest.mark.parametrize("snippet", [
    "import sys\nsys.path.insert(0, 'x')\n",
    "import sys as s\ns.path.append('x')\n",
    "from sys import path\npath.extend(['x'])\n",
    "import sys\nsys.path = ['x'] + sys.path\n",
    "import sys\nsys.path[:0] = ['x']\n",
    "import sys\nsys.path += ['x']\n",
    "import site\nsite.addsitedir('x')\n",
])
def test_each_kind_of_edit_is_found(tmp_path, snippet):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text(snippet)
    edits = sys_path_edits(tmp_path)
    assert len(edits) == 1 and edits[0].startswith("tools/t.py:2: "), edits


def test_reading_sys_path_is_not_an_edit(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("import sys\nprint(sys.path[0], list(sys.path))\n"
                                             "x = sys.path.index('a')\n")
    assert sys_path_edits(tmp_path) == []
