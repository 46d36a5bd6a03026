"""params.yaml, the presets and dvc.yaml agree: every params key a stage lists exists in every preset, and every
stage's code deps are exactly the package modules its `pte` command runs (computed from the import graph)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pte.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def _has(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_cover_every_dvc_param(preset):
    load_params(preset)
    data = yaml.safe_load(preset.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for key in body.get("params", []):
            assert _has(data, key), f"{preset.name} lacks `{key}` that stage {name} depends on"


def test_params_yaml_is_the_cpu_demo_preset():
    assert (ROOT / "params.yaml").read_text() == (ROOT / "presets" / "cpu-demo.yaml").read_text()


def _leaves(data: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a params mapping (``evaluate.protocols`` and ``data`` sources are values)."""
    out = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in ("evaluate.protocols",):
            out += _leaves(value, dotted + ".")
        else:
            out.append(dotted)
    return out


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_key_is_read_by_a_stage_that_lists_it_or_absent(preset, recwarn):
    """Every key a preset writes changes its run: some stage lists it (or its section) in dvc.yaml, so editing it
    reruns that stage, and it is not a ``train`` subsection the preset's objective ignores (loading warns about
    those: the preset must omit them). That the code reads every key outside validation is
    tests/test_modules.py's check."""
    data = yaml.safe_load(preset.read_text())
    params = load_params(preset)
    assert not [w for w in recwarn if "reads only" in str(w.message)], [str(w.message) for w in recwarn]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {key for stage in stages.values() for key in stage.get("do", stage).get("params", [])}
    for key in _leaves(data):
        parts = key.split(".")
        assert any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1)), (
            f"{preset.name}: `{key}` is listed by no stage of dvc.yaml: editing it would rerun nothing")
    ignored = set(data.get("train", {})) & {"rollout", "grpo", "sft", "distill"} - set(params.train.read_sections())
    assert not ignored, f"{preset.name}: `train.{sorted(ignored)}` is ignored under its objective"


def test_an_unread_train_subsection_warns_and_moved_keys_name_their_new_place():
    from pte.config import params_from_dict

    with pytest.warns(UserWarning, match=r"`train.grpo` is set but `train.objective` = 'sft' reads only"):
        params_from_dict({"train": {"objective": "sft", "grpo": {"beta": 0.1}}})
    # distill on rollouts reads the rollout settings, on solutions it does not
    assert params_from_dict({"train": {"objective": "distill"}}).train.read_sections() == ("distill", "rollout")
    with pytest.warns(UserWarning, match="train.rollout"):
        params_from_dict({"train": {"objective": "distill", "distill": {"source": "solutions"},
                                    "rollout": {"num_generations": 4}}})
    for old, new in (({"grpo": {"temperature": 0.7}}, "train.rollout.temperature"),
                     ({"grpo": {"allow_last_number": True}}, "data.allow_last_number"),
                     ({"train": {"sft_eviction_weight": 3.0}}, "train.sft.eviction_weight"),
                     ({"train": {"rollout_batch": 8}}, "train.rollout.batch"),
                     ({"evaluate": {"evict_ratio": 0.5}}, "cache.evict_ratio"),
                     ({"evaluate": {"compile_decode": True}}, "cache.compile_decode")):
        with pytest.raises(ValueError, match=f"`{new}`"):
            params_from_dict(old)


def test_every_stage_code_dependency_exists():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage.get("do", stage).get("deps", []):
            if dep.startswith("pte/"):
                assert (ROOT / dep).is_file(), f"stage {name}: {dep} does not exist"


# -- code dependencies: every module a stage runs is a dep ----------------------------------------------------------

PACKAGE = ROOT / "pte"
# `pte <command>` -> cli.main -> stages._cmd -> stage_*
DISPATCH = {"pte.pipeline.cli": ("main",), "pte.pipeline.stages": ("_cmd",)}
_LOADERS = {"find_spec", "import_module"}  # importlib calls whose literal "pte.x" argument runs that module


def _module_file(name: str) -> Path | None:
    """``pte.a.b`` -> ``pte/a/b.py`` or ``pte/a/b/__init__.py`` (None when it is not a module of the package)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """``pte.*`` modules that the statements under ``node`` import (anywhere in it, lazy imports included)."""
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolve against this module's package
                parent = module.split(".")[: len(module.split(".")) - n.level + (1 if is_package else 0)]
                base = ".".join(parent + ([n.module] if n.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in n.names}  # `from pte import data`: a submodule, if it is one
        elif (isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant)
              and isinstance(n.args[0].value, str)
              and getattr(n.func, "attr", getattr(n.func, "id", None)) in _LOADERS):
            found.add(n.args[0].value)
    return {m for m in found if m == "pte" or m.startswith("pte.")}


def _with_parents(names: set[str]) -> set[str]:
    """Importing ``pte.a.b`` runs ``pte/__init__.py`` and ``pte/a/__init__.py`` too."""
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return {n for n in out if _module_file(n) is not None}


def _tree(name: str) -> ast.Module:
    return ast.parse(_module_file(name).read_text())


def _functions(tree: ast.Module, names: tuple[str, ...]) -> list[ast.AST]:
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]


def stage_modules(command: str) -> set[Path]:
    """The package files that ``pte <command>`` runs: the dispatch path (module-level imports of ``pte.pipeline.cli``
    and ``pte.pipeline.stages``, ``main``, ``_cmd`` and the stage's ``stage_<command>`` function), then everything those
    modules import, transitively, including imports inside functions (which of them run is not known statically)."""
    stage_fn = "stage_" + command.replace("-", "_")
    assert _functions(_tree("pte.pipeline.stages"), (stage_fn,)), \
        f"pte/pipeline/stages.py has no {stage_fn} for `pte {command}`"
    todo: set[str] = set(DISPATCH)
    for module, fns in DISPATCH.items():
        tree = _tree(module)
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top + _functions(tree, fns + ((stage_fn,) if module == "pte.pipeline.stages" else ())):
            todo |= _imported(node, module, False)
    seen: set[str] = set(DISPATCH)
    todo = _with_parents(todo) - seen
    while todo:
        name = todo.pop()
        seen.add(name)
        path = _module_file(name)
        todo |= _with_parents(_imported(ast.parse(path.read_text()), name, path.name == "__init__.py")) - seen
    return {_module_file(n).relative_to(ROOT) for n in _with_parents(seen)}


def _stage_commands() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage -> (its `pte` command, its deps)."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        assert words[0] == "pte", f"stage {name}: expected a `pte <command>` cmd, got {body['cmd']!r}"
        out[name] = (words[1], list(body.get("deps", [])))
    return out


def test_import_graph_follows_lazy_and_relative_imports():
    mods = {p.as_posix() for p in stage_modules("register")}
    # registry imports tracking and data at module level, inference inside a method, and finds registry_model by name
    assert {"pte/__init__.py", "pte/pipeline/cli.py", "pte/pipeline/stages.py", "pte/pipeline/registry.py",
            "pte/pipeline/tracking.py", "pte/data/rows.py",
            "pte/engine/inference.py", "pte/pipeline/registry_model.py", "pte/config/__init__.py"} <= mods
    # other stages' functions are not followed
    assert "pte/training/train.py" not in mods and "pte/pipeline/evaluate.py" not in mods
    assert "pte/training/grpo.py" in {p.as_posix() for p in stage_modules("train")}


@pytest.mark.parametrize("stage", sorted(_stage_commands()))
def test_stage_deps_list_exactly_the_modules_it_runs(stage):
    """A stage whose code deps miss a module it runs would not rerun when that module changes (stale results);
    one listing a module it does not run reruns for nothing."""
    command, deps = _stage_commands()[stage]
    needed = {p.as_posix() for p in stage_modules(command)}
    listed = {d for d in deps if d.startswith("pte/") and d.endswith(".py")}
    fix = "set its pte/ deps in dvc.yaml to:\n" + "\n".join(f"        - {m}" for m in sorted(needed))
    assert not needed - listed, f"stage {stage} runs {sorted(needed - listed)} but does not depend on them; {fix}"
    assert not listed - needed, f"stage {stage} lists {sorted(listed - needed)} that `pte {command}` never runs; {fix}"
