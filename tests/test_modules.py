"""Package hygiene: modules stay small, module-level imports have no cycle, and every params key is read somewhere."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pte.config import Params

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pte"
MAX_LINES = 450
# Modules over MAX_LINES today, each with why it is not split (yet); the test fails when one shrinks below the limit,
# so the list cannot go stale.
LONG_MODULES = {
    "evaluate.py": "one protocol (batching, pass@k, bootstrap, plots' data) whose parts share the batch plan",
    "registry.py": "register + predictor + promotion; the predictor file (registry_model.py) is already separate",
    "rewards.py": "the answer oracle: extraction and equivalence rules that are tested as one unit",
    "tracking.py": "MLflow and JSON-lines trackers plus offline sync, which replays the same record format",
}


def _modules() -> dict[str, Path]:
    return {"pte." + p.stem if p.stem != "__init__" else "pte": p for p in sorted(PKG.glob("*.py"))}


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in _modules().values()}
    too_long = {n: s for n, s in sizes.items() if s > MAX_LINES and n not in LONG_MODULES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}; split them by concern (as pte/config.py was)"
    stale = sorted(n for n in LONG_MODULES if sizes.get(n, 0) <= MAX_LINES)
    assert not stale, f"{stale} are now <= {MAX_LINES} lines; remove them from LONG_MODULES in {Path(__file__).name}"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(tree: ast.Module, name: str, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports when it is imported (top level, inside if/try, not TYPE_CHECKING)."""
    out: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the package `pte`
                base = "pte" + ("." + base if base else "")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in modules and m != name}


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {n: _module_level_imports(ast.parse(p.read_text()), n, modules) for n, p in modules.items()}
    graph["pte"] = set()  # the package __init__ resolves names lazily (PEP 562); importing it imports no module
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}; move the shared part to a module both import")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _attribute_reads() -> set[str]:
    """Attribute names read anywhere in pte/ and flows/, except inside ``__post_init__`` (validation is no use)."""
    names: set[str] = set()
    for path in [*PKG.glob("*.py"), *(ROOT / "flows").glob("*.py")]:
        tree = ast.parse(path.read_text())
        skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__post_init__"
                for n in ast.walk(f)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in skip}
        # getattr(cfg, "name") with a literal name
        names |= {n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call) and id(n) not in skip
                  and isinstance(n.func, ast.Name) and n.func.id == "getattr" and len(n.args) > 1
                  and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)}
    return names


def test_every_params_key_is_read_somewhere():
    """A key that nothing reads is a setting that silently does nothing (as `sampling:` did)."""
    reads = _attribute_reads()
    unread = [f"{section.name}.{f.name}" for section in dataclasses.fields(Params)
              for f in dataclasses.fields(Params.__dataclass_fields__[section.name].default_factory())
              if f.name not in reads]
    assert not unread, f"params keys read nowhere in pte/ or flows/: {unread}; use them or remove them"


def test_module_map_names_every_module():
    """README.md's code map and the package docstring list every module of pte/ (and no module that is gone)."""
    import re

    import pte

    names = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Code map"):]
    section = section[: section.index("\n## ", 1)]
    in_readme = set(re.findall(r"`(\w+)\.py`", section))
    in_doc = set(re.findall(r"``(\w+)``", pte.__doc__[pte.__doc__.index("Module map"):])) & (names | in_readme)
    missing, gone = sorted(names - in_readme), sorted(in_readme - names)
    assert not missing and not gone, f"README.md code map: missing {missing}, no longer in pte/: {gone}"
    assert names <= in_doc, f"pte/__init__.py module map: missing {sorted(names - in_doc)}"


def test_docstrings_cite_the_docs_not_a_design_file():
    """Citations point at docs/*.md of the repository (or the paper), never at a design file outside it."""
    word = "DES" + "IGN"  # spelled apart so that this file does not match itself
    files = [p for d in ("pte", "tests", "flows", "bench", "docs", "presets") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml")] + [ROOT / "README.md", ROOT / "params.yaml"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if word in line]
    assert not hits, f"{word} citations left: {hits}; point them at the docs/*.md section instead"
