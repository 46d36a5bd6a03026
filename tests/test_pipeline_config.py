"""params.yaml, the presets and dvc.yaml agree: every params key a stage lists exists in every preset."""

from __future__ import annotations

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


def test_every_stage_code_dependency_exists():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage.get("do", stage).get("deps", []):
            if dep.startswith("pte/"):
                assert (ROOT / dep).is_file(), f"stage {name}: {dep} does not exist"
