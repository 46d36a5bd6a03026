"""The package's layering (docs/pipeline.md, "Layout"): imports point down, pipeline -> training -> engine -> config,
with data a leaf beside the engine; research code stays outside the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pte"
LAYERS = ("config", "data", "engine", "training", "pipeline")
FORBIDDEN = {
    # layer -> the layers it must never import (at module level or inside a function)
    "config": {"engine", "training", "pipeline"},
    "data": {"engine", "training", "pipeline"},
    "engine": {"training", "pipeline"},
    "training": set(),
    "pipeline": set(),
}


def imported_pte_modules(path: Path) -> set[str]:
    """``pte.*`` module names that ``path`` imports anywhere (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return {m for m in out if m.startswith("pte.")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_package_is_made_of_the_concern_folders():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert top == sorted(["__init__.py", *LAYERS])
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), f"pte/{layer} is not a package"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in imported_pte_modules(path):
            if layer_of(module) in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from pte.training.train import train\n    import pte.engine.cache\n")
    assert imported_pte_modules(f) == {"pte.training.train", "pte.engine.cache"}
    assert layer_of("pte.training.train") == "training" and layer_of("pte") is None


def test_no_research_module_is_packaged():
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & {"study", "mechanism"}
    assert (ROOT / "research" / "README.md").is_file()
