"""bench/train_profile.py: one smoke-preset GRPO step, split into exclusive phases that add up to the step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_splits_one_step_into_phases(tmp_path):
    out = tmp_path / "profile.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "train_profile.py"), "--params",
                          str(ROOT / "presets" / "smoke.yaml"), "--method", "pte", "--torch-profile", "5", "--floor",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "replay forward" in res.stdout and "aten::" in res.stdout  # the split and the profiler's table
    result = json.loads(out.read_text())
    (step,) = result["steps"]
    phases, calls = step["phases"], step["calls"]
    assert set(phases) <= set(result["phases"])
    for name in ("rollout: generate", "reference forward", "replay forward", "loss", "backward", "optimizer step"):
        assert phases[name] > 0, name
    assert abs(sum(phases.values()) - step["seconds"]) < 1e-6  # exclusive phases, "other" the remainder
    # smoke: 2 prompts x 2 samples in one rollout batch, micro-batch 2: two replays and two references
    assert calls["rollout: generate"] == 1 and calls["replay forward"] == 2 and calls["reference forward"] == 2
    assert calls["backward"] == calls["loss"] > 2  # one backward per replay segment
    assert calls["optimizer step"] == 1 and step["torch_profiler"]
    assert step["trainer_timing"]["timing/rollout_s"] > 0 and step["mean_length"] > 0
    # --floor: the roofline and bandwidth, and a floor for every phase that ran the model (and the backward)
    assert result["roofline"]["gflops"] > 0 and result["roofline"]["read"]["gb_per_s"] > 0
    floors = step["floors"]
    assert set(floors) == {"rollout: generate", "reference forward", "replay forward", "backward"}
    assert floors["backward"]["flops"] == floors["replay forward"]["flops"] > 0
    assert floors["reference forward"]["flops"] == floors["replay forward"]["flops"]  # the same tokens, adapters off
    for f in floors.values():
        assert 0 < f["floor_s"] and f["bound"] in ("memory", "compute")
    assert step["floor_s"] == sum(f["floor_s"] for f in floors.values()) < step["seconds"]
    assert "floor of the step" in res.stdout
