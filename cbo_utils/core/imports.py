"""The package's own import graph, read from the source (AST), never by importing: which ``cbo_utils`` modules a
piece of code imports, and the closure of that — what the Make graph declares as a notebook's library
prerequisites, and what the layering test walks.

Every import counts, at module level or inside a function; importing ``cbo_utils.a.b`` also runs
``cbo_utils/__init__.py`` and ``cbo_utils/a/__init__.py``, so those belong to the closure too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from cbo_utils.core.artifacts import PACKAGE_DIR

PACKAGE = "cbo_utils"


def module_file(module: str) -> Path | None:
    """``cbo_utils.a.b`` → its source file (a module or a package's ``__init__.py``), None when there is none."""
    parts = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def module_name(path: Path) -> str:
    rel = Path(path).resolve().relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(source: str, module: str | None = None, is_package: bool = False) -> set[str]:
    """The ``cbo_utils`` modules that ``source`` imports (the module itself for ``from M import name``, or
    ``M.name`` when that is a module). ``module`` resolves relative imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + "."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (module or PACKAGE).split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            out.add(target)
            for a in node.names:
                if module_file(f"{target}.{a.name}") is not None:
                    out.add(f"{target}.{a.name}")
    return {m for m in out if module_file(m) is not None}


def module_imports(module: str) -> set[str]:
    f = module_file(module)
    return imported_modules(f.read_text(), module, f.name == "__init__.py") if f else set()


def import_closure(modules: Iterable[str]) -> set[str]:
    """Every ``cbo_utils`` module that importing ``modules`` can run (their imports, transitively, and the
    ``__init__`` of every package on the way)."""
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(p for p in _parents(m) if p not in seen)
        todo.extend(module_imports(m) - seen)
    return seen


def notebook_sources(path) -> str:
    """The code cells of a notebook as one Python source (IPython magics and shell escapes dropped)."""
    import json

    nb = json.loads(Path(path).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    lines = [ln for cell in cells for ln in cell.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def closure_files(modules: Iterable[str]) -> list[str]:
    """The source files of :func:`import_closure`, relative to the repository (``cbo_utils/...``), sorted."""
    root = PACKAGE_DIR.parent
    return sorted(str(module_file(m).relative_to(root)) for m in import_closure(modules))
