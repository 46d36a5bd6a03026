"""bench/rollout.py: the GRPO shape, the roofline / MFU fields and the memory fields, on a tiny random model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "rollout.py"
sys.path.insert(0, str(ROOT / "bench"))

from rollout import held_thinking, rollout_flops, shape_prompts  # noqa: E402


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_grpo_shape_prompts_are_groups_of_distinct_var_chain_problems():
    rows = shape_prompts("grpo", 8, 32)
    assert len(rows) == 32 and len(set(rows)) == 8
    assert all(rows[4 * g : 4 * g + 4] == [rows[4 * g]] * 4 for g in range(8))  # each group's rows consecutive
    assert rows[0].startswith("Run the program and give the final value of") and "\\boxed{}" in rows[0]
    assert shape_prompts("bench", 1, 4) == [shape_prompts("bench", 1, 1)[0]] * 4
    with pytest.raises(ValueError, match="multiple"):
        shape_prompts("grpo", 8, 12)


def test_held_thinking_follows_the_engines_eviction_schedule(one_thread):
    """The FLOP count's cache occupancy is the engine's: same events, same most slots held."""
    from conftest import batch, tiny

    from pte.config import CacheConfig, SamplingConfig
    from pte.engine.rollout import generate

    model, tok = tiny("qwen2-tiny")
    ids, mask = batch(tok)
    n, window = 23, 8
    out = generate(model, ids, mask, CacheConfig(window=window), SamplingConfig(max_new_tokens=n, temperature=0.0),
                   [], tok.pad_token_id)
    held = held_thinking(n, window, out.plan.evict)
    assert len(held) == n - 1 and max(held) == window
    assert out.max_cache_tokens == ids.shape[1] + max(held)
    drops = [j for j in range(1, n - 1) if held[j] < held[j - 1]]
    assert drops == out.event_steps
    assert held_thinking(n, None, 0) == list(range(1, n))


def test_rollout_flops_counts_each_term():
    config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})()
    # two distinct prompts (3 and 2 real tokens) x 2 rows each, 4 new tokens, full cache
    f = rollout_flops(config, 100, [3, 3, 2, 2], [0, 2], 4, None, 0)
    assert f["tokens"] == 3 + 2 + 4 * 3  # each distinct prompt once + B (N - 1) decode tokens
    assert f["logit_rows"] == 2 + 4 * 3
    # prefill: 1+2+3 and 1+2; decode token j of a row attends to its prompt + j + 1 held tokens
    assert f["keys"] == (6 + 3) + sum(p + j + 1 for p in (3, 3, 2, 2) for j in range(3))
    assert f["linear_flops"] == 2 * 100 * f["tokens"]
    assert f["lm_head_flops"] == 2 * 8 * 10 * f["logit_rows"]
    assert f["attention_flops"] == 4 * 2 * 2 * 4 * f["keys"]
    assert f["model_flops"] == f["linear_flops"] + f["lm_head_flops"] + f["attention_flops"]
    bounded = rollout_flops(config, 100, [3, 3, 2, 2], [0, 2], 4, 1, 1)  # a 1-slot window holds one token
    assert bounded["keys"] == (6 + 3) + sum(p + 1 for p in (3, 3, 2, 2) for _ in range(3))


def test_grpo_shape_reports_speed_ratio_roofline_and_mfu(tmp_path):
    out = tmp_path / "grpo.json"
    res = _run("--shape", "grpo", "--model", "random:qwen2-tiny", "--lengths", "12", "--window", "4",
               "--gemm-size", "128", "--impls", "bounded", "compiled", "hf", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x HF" in res.stdout and "% roofline" in res.stdout and "GEMM roofline" in res.stdout
    result = json.loads(out.read_text())
    assert (result["shape"], result["batch"], result["prompts"], result["window"], result["temperature"]) == (
        "grpo", 32, 8, 4, 1.0)
    runs = {r["impl"]: r for r in result["runs"]}
    assert set(runs) == {"bounded", "compiled", "hf"}
    for r in runs.values():
        assert r["batch"] == 32 and r["new_tokens"] == 12 and r["prompts"] == 8
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["loaded_bytes"] > 0
        assert r["flops"]["model_flops"] == sum(r["flops"][k] for k in ("linear_flops", "lm_head_flops",
                                                                          "attention_flops"))
        assert math.isfinite(r["mfu"]) and r["mfu"] > 0
    assert runs["bounded"]["roofline"]["n"] == 128 and runs["bounded"]["roofline"]["gflops"] > 0
    assert "roofline" not in runs["hf"]  # measured once per length, applied to both
    # same prompts and tokens for both; the bounded engine attends to fewer keys and holds fewer KV slots
    assert runs["bounded"]["flops"]["tokens"] == runs["hf"]["flops"]["tokens"]
    assert runs["bounded"]["flops"]["keys"] < runs["hf"]["flops"]["keys"]
    assert runs["bounded"]["max_cache_tokens"] == runs["bounded"]["prompt_tokens"] + 4
    assert runs["bounded"]["kv_cache_bytes"] < runs["hf"]["kv_cache_bytes"]
    # compiled decode: the same work as the bounded engine, its compile paid in the warm-up
    assert runs["compiled"]["flops"] == runs["bounded"]["flops"] and runs["compiled"]["window"] == 4
    assert runs["compiled"]["warmup_seconds"] > runs["bounded"]["warmup_seconds"]
    summary = result["summary"][0]
    assert summary["speed_ratio"] > 0 and summary["bounded_mfu"] > 0 and summary["hf_mfu"] > 0
    assert summary["compiled_speed_ratio"] > 0 and summary["compiled_mfu"] > 0
    # the roofline-model floor: max(FLOPs / GEMM roofline, forwards x weight bytes / read bandwidth), per run
    read = runs["bounded"]["roofline"]["read"]
    assert read["bytes"] == 64 << 20 and read["gb_per_s"] > 0 and "% of floor" in res.stdout
    for r in runs.values():
        assert r["forwards"] == 12 and r["weight_bytes"] > 0 and r["bound"] in ("memory", "compute")
        memory_s = 12 * r["weight_bytes"] / (read["gb_per_s"] * 1e9)
        compute_s = r["flops"]["model_flops"] / (runs["bounded"]["roofline"]["gflops"] * 1e9)
        assert r["floor_s"] == pytest.approx(max(memory_s, compute_s)) and r["of_floor"] == pytest.approx(
            r["floor_s"] / r["seconds"])


def test_bench_shape_keeps_its_cli_and_reports_memory_growth(tmp_path):
    out = tmp_path / "bench.json"
    res = _run("--model", "random:llama-tiny", "--batch", "2", "--lengths", "8", "16", "--window", "4",
               "--gemm-size", "0", "--impls", "bounded", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["shape"], result["batch"], result["temperature"]) == ("bench", 2, 0.0)
    assert {(r["impl"], r["new_tokens"]) for r in result["runs"]} == {("bounded", 8), ("bounded", 16)}
    assert set(result["peak_growth"]) == {"bounded"} and set(result["working_growth"]) <= {"bounded"}
    assert all("mfu" not in r for r in result["runs"])  # --gemm-size 0: no roofline
    by = {(r["impl"], r["new_tokens"]): r for r in result["runs"]}
    assert by["bounded", 8]["max_cache_tokens"] == by["bounded", 16]["max_cache_tokens"]  # flat
    assert by["bounded", 16]["kv_cache_bytes"] == by["bounded", 8]["kv_cache_bytes"]


def test_gemm_roofline_reports_gflops():
    from rollout import gemm_roofline

    r = gemm_roofline(64, "cpu", "float32", min_seconds=0.0)
    assert r["reps"] >= 3 and r["best_s"] > 0 and r["gflops"] == pytest.approx(2 * 64**3 / r["best_s"] / 1e9)
