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
    "tracking.py": "MLflow and JSON-lines trackers plus offline sync, which replays the same record format",
}


def _modules() -> dict[str, Path]:
    """``pte.a.b`` -> its file, for every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in _modules().values()}
    too_long = {n: s for n, s in sizes.items() if s > MAX_LINES and n not in LONG_MODULES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}; split them by concern (as pte/config/ is)"
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
            if node.level:  # relative: resolve against the importing module's package
                pkg = name.split(".")[: len(name.split(".")) - node.level + (modules[name].name == "__init__.py")]
                base = ".".join(pkg + ([base] if base else []))
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
    for path in [*PKG.rglob("*.py"), *(ROOT / "flows").glob("*.py")]:
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

    def keys(obj, prefix):  # nested sections (train.sft, ...) are dataclass values
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [(prefix, f.name)]

    unread = [f"{prefix}{name}" for prefix, name in keys(Params(), "") if name not in reads]
    assert not unread, f"params keys read nowhere in pte/ or flows/: {unread}; use them or remove them"


def test_module_map_names_every_module():
    """README.md's layout tree and the package docstring list every module of pte/ (and no module that is gone)."""
    import re

    import pte

    paths = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    paths.add("config/__init__.py")  # the one package whose __init__ holds code (Params, load_params)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    section = section[: section.index("\n## ", 1)]
    in_readme, folder = set(), None
    for line in section.splitlines():
        if m := re.match(r"  (\w+)/", line):
            folder = m.group(1)
        elif (m := re.match(r"    (\w+)\.py\b", line)) and folder:
            in_readme.add(f"{folder}/{m.group(1)}.py")
    doc = pte.__doc__[pte.__doc__.index("Layout"):]
    in_doc = set()
    for bullet in doc.split("\n* ")[1:]:
        layer, _, mods = bullet.partition(":")
        in_doc |= {f"{layer.strip('`').removeprefix('pte.')}/{m}.py" for m in re.findall(r"``(\w+)``", mods)}
    missing, gone = sorted(paths - in_readme), sorted(in_readme - paths)
    assert not missing and not gone, f"README.md layout: missing {missing}, no longer in pte/: {gone}"
    assert paths - {"config/__init__.py"} <= in_doc, f"pte/__init__.py layout: missing {sorted(paths - in_doc)}"


def test_docstrings_cite_the_docs_not_a_design_file():
    """Citations point at docs/*.md of the repository (or the paper), never at a design file outside it."""
    word = "DES" + "IGN"  # spelled apart so that this file does not match itself
    files = [p for d in ("pte", "tests", "flows", "bench", "docs", "presets") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml")] + [ROOT / "README.md", ROOT / "params.yaml"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if word in line]
    assert not hits, f"{word} citations left: {hits}; point them at the docs/*.md section instead"


def _texts() -> list[Path]:
    """The files whose words a reader sees: package, tests, flows, bench, docs, presets, deployment READMEs."""
    dirs = ("pte", "tests", "flows", "bench", "docs", "presets", "docker", "k8s")
    return sorted([p for d in dirs for p in (ROOT / d).rglob("*") if p.is_file() and (
        p.suffix in (".py", ".md", ".yaml") or p.name.startswith("Dockerfile")) and "__pycache__" not in p.parts]
        + [ROOT / "README.md", ROOT / "params.yaml", ROOT / "research" / "README.md"])


def test_every_cited_document_is_in_the_repository():
    """A ``*.md`` that a docstring, comment or doc names exists in the repository (at that path, relative to the root
    or to the citing file, or as a committed file of that name), so no citation points outside it."""
    import re

    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in str(p)}
    missing = []
    for path in _texts():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for cited in re.findall(r"(?<![\w/.-])([\w./-]+\.md)\b", line):
                if "://" in line[: line.find(cited)].rsplit(" ", 1)[-1]:
                    continue  # part of a URL
                if not ((ROOT / cited).exists() or (path.parent / cited).exists() or cited in names):
                    missing.append(f"{path.relative_to(ROOT)}:{i} cites {cited}")
    assert not missing, "citations of documents the repository does not hold:\n" + "\n".join(missing)


def test_no_tracker_numbers():
    """Docs and code speak of topics, not of tracker entries the repository does not ship."""
    import re

    rx = re.compile(r"\b[Ii]ssues? #?\d+|\b[Aa]cceptance \d+|(?<![\w&])#\d+\b")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in _texts()
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]
    assert not hits, "tracker numbers left:\n" + "\n".join(hits)
