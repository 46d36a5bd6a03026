"""Killing `dvc repro` during training and running it again resumes from the checkpoint.

A clone of this checkout on the smoke preset with more training steps; `dvc repro train@pte` is killed (SIGKILL to
its whole process group, as a lost machine would) once a mid-run checkpoint exists; the second `dvc repro` must
continue from that checkpoint, finish with one metrics row per step, and leave `dvc status` clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_flows import _clone, _env, _exe, _tail

STEPS = 8


def _latest_step(checkpoints: Path) -> int:
    latest = checkpoints / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    return int(name.split("-")[1]) if name.startswith("step-") else 0


@pytest.mark.slow
def test_killed_dvc_repro_resumes_training(tmp_path):
    clone = _clone(tmp_path / "repo")
    params = yaml.safe_load((clone / "presets" / "smoke.yaml").read_text())
    params["train"].update(steps=STEPS, save_every=1)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp_path / "prefect", clone)
    repro = [_exe("dvc"), "repro", "train@pte"]
    ckpt = clone / "models" / "pte" / "checkpoints"

    first = subprocess.Popen(repro, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and _latest_step(ckpt) < 3:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    out1 = first.communicate()[0].decode(errors="replace")
    killed_at = _latest_step(ckpt)
    assert 3 <= killed_at < STEPS, f"killed at step {killed_at}\n{_tail(out1)}"
    assert not (clone / "models" / "pte" / "adapter").exists()  # the stage did not finish

    second = subprocess.run(repro, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, _tail(out2)
    resumed = [int(m.split()[0]) for m in out2.split("resuming from the checkpoint of step ")[1:]]
    assert resumed and resumed[0] >= killed_at, _tail(out2)
    assert "Running stage 'base_model'" not in out2 and "Running stage 'data'" not in out2  # upstream was kept
    lines = [json.loads(line) for line in (clone / "models/pte/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "step" in r]  # every step once, none repeated by the resume; params lines aside
    assert [r["step"] for r in rows] == list(range(STEPS)) or [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (clone / "models" / "pte" / "adapter").is_dir()
    status = subprocess.run([_exe("dvc"), "status", "train@pte", "--json"], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
