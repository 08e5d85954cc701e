"""Reading a tree's imports with `ast` alone (nothing of it is imported, so a tree whose imports
are broken can still be read): every `import` and `from ... import` at any depth (inside
functions, under `if TYPE_CHECKING:`), relative ones resolved against the file's package, and
`importlib.import_module("...")` / `__import__("...")` calls with a literal name; the edges between
packages and between modules, and the circles in a graph of them. The rules that hold a tree to
the layering are in tests/unit/test_import_graph.py.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, e.g. moe_dist/moe/layer.py
    line: int
    source: str  # the statement as written
    target: str  # the absolute module imported, e.g. moe_dist.parallel.groups or torch.distributed

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source}"


def library_files(base: Path) -> list[Path]:
    return sorted((base / "moe_dist").rglob("*.py"))


def module_name(base: Path, path: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str | None:
    """`moe_dist.x.y` -> `x` (a file directly under moe_dist/ is its own package); None outside."""
    parts = module.split(".")
    if parts[0] != "moe_dist":
        return None
    return parts[1] if len(parts) > 1 else "moe_dist"


def _from_module(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """X of `from X import a`, relative ones resolved against the importing module."""
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve_from(node: ast.ImportFrom, current: str, is_package: bool) -> list[str]:
    """The modules a `from X import a, b` may load: X itself and, where a name is a submodule, X.a."""
    module = _from_module(node, current, is_package)
    # `from moe_dist import train` / `from moe_dist.x import y`: y may be a module; for the package
    # map only `from moe_dist import <package>` adds information, the rest is in X already.
    if module == "moe_dist":
        return [f"moe_dist.{a.name}" for a in node.names if a.name != "*"] or [module]
    if module == "torch":
        return [f"torch.{a.name}" if a.name == "distributed" else module for a in node.names]
    return [module]


def segment(lines: list[str], node: ast.AST) -> str:
    """The statement's source on one line (`ast.get_source_segment` rescans the file on each call;
    ast's column offsets count UTF-8 bytes)."""
    rows = [line.encode() for line in lines[node.lineno - 1: node.end_lineno]]
    rows[-1] = rows[-1][: node.end_col_offset]
    rows[0] = rows[0][node.col_offset:]
    return " ".join(b" ".join(rows).decode(errors="replace").split())


def _is_import_call(node: ast.AST) -> bool:
    """`importlib.import_module("literal")`, `import_module("literal")` or `__import__("literal")`."""
    return (isinstance(node, ast.Call) and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                 or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))))


@functools.cache
def _parsed(path: Path, mtime_ns: int, size: int) -> tuple[list[str], ast.Module]:
    text = path.read_text()
    return text.splitlines(), ast.parse(text, filename=str(path))


def parsed(path: Path) -> tuple[list[str], ast.Module]:
    """The file's lines and tree, parsed once however many rules read it."""
    stat = path.stat()
    return _parsed(path, stat.st_mtime_ns, stat.st_size)


def imports_of(base: Path, path: Path) -> list[Import]:
    stat = path.stat()
    return _imports_of(base, path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _imports_of(base: Path, path: Path, mtime_ns: int, size: int) -> list[Import]:
    rel = path.relative_to(base).as_posix()
    lines, tree = parsed(path)
    current, is_package = module_name(base, path), path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, segment(lines, node), alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [Import(rel, node.lineno, segment(lines, node), target)
                      for target in _resolve_from(node, current, is_package)]
        elif _is_import_call(node):
            found.append(Import(rel, node.lineno, segment(lines, node), node.args[0].value))
    return found


def all_imports(base: Path) -> list[Import]:
    return [imp for path in library_files(base) for imp in imports_of(base, path)]


def file_package(file: str) -> str:
    parts = file.removesuffix(".py").split("/")
    return package_of(".".join(parts[:-1] if parts[-1] == "__init__" else parts))


def package_edges(base: Path) -> list[tuple[str, str, Import]]:
    """(importing package, imported package, the import) for every import between two packages."""
    edges = []
    for imp in all_imports(base):
        src, dst = file_package(imp.file), package_of(imp.target)
        if dst is not None and dst != "moe_dist" and src != dst:
            edges.append((src, dst, imp))
    return edges


def is_distributed(target: str) -> bool:
    return target == "torch.distributed" or target.startswith("torch.distributed.")


def module_edges(base: Path) -> list[tuple[str, str, Import]]:
    """(importing module, imported module, the import) between two modules of moe_dist, at any
    depth. `from X import a` names X.a where that is a module, else X; a name that is no module
    counts as its longest prefix that is. Only the module named counts, not the packages above
    it that Python runs first: else every `__init__.py` re-exporting its submodules would close
    a circle with each of them."""
    modules = {module_name(base, path): path for path in library_files(base)}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = []
    for current, path in modules.items():
        rel = path.relative_to(base).as_posix()
        lines, tree = parsed(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, node) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _from_module(node, current, path.name == "__init__.py")
                targets = [(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module, node)
                           for a in node.names]
            elif _is_import_call(node):
                targets = [(node.args[0].value, node)]
            else:
                continue
            for target, at in targets:
                dst = known(target) if package_of(target) is not None else None
                if dst is not None and dst != current:
                    edges.append((current, dst, Import(rel, at.lineno, segment(lines, at), dst)))
    return edges


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components of two or more nodes: each is a cycle or several."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycle_report(kind: str, graph: dict[str, dict[str, Import]]) -> list[str]:
    return [f"import cycle between {kind} {sorted(c)}; its edges:\n" + "\n".join(
        f"    {src} -> {dst}: {imp}" for src in sorted(c) for dst, imp in sorted(graph[src].items()) if dst in c)
        for c in strongly_connected(graph)]
