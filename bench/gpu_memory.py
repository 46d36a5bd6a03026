"""One GRPO training step on a GPU, random-weight Qwen2.5-3B architecture: peak memory and time, ours vs TRL.

The GPU counterpart of ``bench/train_memory.py`` (docs/evaluation.md, "Memory": rollout 3072, window 1024, bf16;
target peak memory PTE / full-cache LoRA <= 0.55, the paper's 45.3/82.8 GB for 3B). No weights are downloaded: the
model is built from a hard-coded ``Qwen2Config`` with Qwen2.5-3B's shape and random weights, saved once (bf16
safetensors) to a temporary directory with the offline SmolLM2 tokenizer, and every worker - our ``pte``, ``lora_c``
(bounded cache, window W), full-cache ``lora`` (``lora_gc``: with activation checkpointing), and TRL's
``GRPOTrainer`` with a peft LoRA of the same rank - loads it from there. Each runs one step (rollout of exactly N
tokens per completion, EOS ignored, replay, backward, update) in a fresh subprocess under ``train_memory``'s RSS
guard. Memory is
``torch.cuda.max_memory_allocated`` over the step (reset just before it, weights included) with the allocator's
reserved memory beside it; time is wall-clock seconds of the step, CUDA-synchronized, without warm-up (every impl
pays the same first-use kernel costs). A worker that runs out of GPU memory is recorded with the GPU's total memory
as a lower bound on its peak, and the ratios it enters become bounds. TRL runs with its own defaults
(``gradient_checkpointing=True``). Prints the ratios pte/lora peak, pte/trl peak and lora/trl time, and writes JSON
(default ``bench/results/gpu_memory_<device>.json``).

Runs only where CUDA is present; elsewhere it exits with status 2. ``--tiny --device cpu`` runs the same code
path with a 2-layer model (Qwen2.5's vocabulary kept) in fp32 on CPU, for tests.

    python bench/gpu_memory.py --lengths 3072 --window 1024
    python bench/gpu_memory.py --lengths 1024 2048 3072 --window 1024 --impls pte lora
    python bench/gpu_memory.py --tiny --device cpu --impls pte lora --lengths 16 --window 8 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import DEFAULT_MODEL, _local_model, write_result  # noqa: E402
from train_memory import GIB, IMPLS, guarded, summarize, worker  # noqa: E402

from pte.engine.models import RANDOM_PRESETS  # noqa: E402

# Qwen2.5-3B(-Instruct)'s architecture: pte.engine.models' random:qwen2.5-3b preset (hidden_act: Qwen2's silu).
QWEN25_3B = {**{k: v for k, v in RANDOM_PRESETS["qwen2.5-3b"].items() if k != "model_type"}, "hidden_act": "silu"}
# Test mode: tiny everywhere except the vocabulary, so that the undecodable-token path below is exercised too.
TINY = {**QWEN25_3B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
NO_CUDA = ("bench/gpu_memory.py needs a CUDA GPU; found none. Run it on a GPU machine: "
           "python bench/gpu_memory.py --lengths 3072 --window 1024 (to test the code path on CPU instead: "
           "--tiny --device cpu).")


def build_model(out_dir: Path, tiny: bool, dtype: str, tokenizer_src: str, device: str = "cpu") -> dict:
    """Write a random-weight Qwen2 model (:data:`QWEN25_3B`, or :data:`TINY`) and the tokenizer to ``out_dir``.

    The model samples ids over Qwen2.5's 151,936-token vocabulary while the SmolLM2 tokenizer knows 49,152: decoding
    skips ids it has no token for (the tokenizers backend drops them), so completions decode to shorter text without
    an error, and every arm scores them with a constant reward (TRL's arm in train_memory does; ours gets
    ``zero_reward``), so the reward never depends on that text. Restricting sampling to the tokenizer's ids instead
    would need a logits mask inside our rollout and TRL's ``generate`` alike and change what is measured; shrinking
    the vocabulary would shrink the embedding and the [B, T, V] logits, a large part of the memory measured.

    The weights are initialised on ``device`` in a child process (spawned, so this parent never holds a CUDA
    context and the GPU memory the workers need): on a GPU that takes seconds where the host CPU took ~2 minutes for
    the 3B model (bench/results/gpu_suite_h200.json, ``build_s``).

    Returns: a description for the JSON (config, parameter count, dtype, tokenizer).
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_build, (str(out_dir), tiny, dtype, tokenizer_src, device))


def _build(out_dir: str, tiny: bool, dtype: str, tokenizer_src: str, device: str) -> dict:
    """:func:`build_model`'s work, in the child process."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from pte.engine.models import load_tokenizer

    tok = load_tokenizer(tokenizer_src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    spec = TINY if tiny else QWEN25_3B
    config = Qwen2Config(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"architecture": "Qwen2.5-3B" if not tiny else "tiny Qwen2 (test mode)", "random_weights": True,
            "config": spec, "parameters": params, "dtype": dtype, "tokenizer": tokenizer_src}


def gpu_worker(impl: str, model_dir: str, n: int, window: int, group: int, rank: int, device: str) -> dict:
    """One impl's step (:func:`train_memory.worker` with ``device`` and a constant reward); a CUDA OOM is a result."""
    import torch

    if device == "cuda":  # cuBLAS/cuDNN handles before the model, not inside the measured step
        torch.ones(8, 8, device="cuda", dtype=torch.bfloat16).matmul(torch.ones(8, 8, device="cuda",
                                                                                dtype=torch.bfloat16))
    try:
        res = worker(impl, model_dir, n, window, group, rank, device=device, zero_reward=True)
    except torch.OutOfMemoryError as exc:
        total = torch.cuda.get_device_properties(0).total_memory
        return {"result": "CUDA out of memory", "peak_bytes": total, "peak_is_lower_bound": True,
                "error": str(exc).splitlines()[0]}
    if device == "cuda":
        res["device_name"] = torch.cuda.get_device_name()
    return res


def worker_cmd(impl: str, model_dir: str, n: int, window: int, group: int, rank: int, device: str) -> list[str]:
    """The command line of one :func:`gpu_worker` run on the model saved in ``model_dir``."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--model-dir", model_dir, "--device",
            device, "--lengths", str(n), "--window", str(window), "--group", str(group), "--rank", str(rank)]


def _device_name(device: str) -> str:
    """The GPU's name, asked in a child process (see :func:`build_model` on CUDA contexts in the parent)."""
    if device != "cuda":
        return platform.processor() or platform.machine() or "cpu"
    code = "import torch; print(torch.cuda.get_device_name(0))"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _print_row(r: dict) -> None:
    if "seconds" in r:
        extra = f"  reserved {r['reserved_peak_bytes'] / GIB:6.2f} GiB" if "reserved_peak_bytes" in r else ""
        print(f"{r['impl']:7s} n={r['new_tokens']:5d}  step {r['seconds']:7.1f} s  "
              f"peak {r['peak_bytes'] / GIB:6.2f} GiB{extra}", flush=True)
    else:
        wall = r.get("wall_s", r.get("worker_wall_s", 0.0))
        print(f"{r['impl']:7s} n={r['new_tokens']:5d}  {r['result']} after {wall:.0f} s", flush=True)


def _print_summary(summary: list[dict]) -> None:
    for row in summary:
        names = [(k.removesuffix("_text").rpartition("_"), text) for k, text in row.items() if k.endswith("_text")]
        parts = [f"{ratio.replace('_over_', '/')} {kind} {text}" for (ratio, _, kind), text in names]
        if not parts:  # a single impl, or its peers failed
            continue
        target = "  (target pte/lora <= 0.55, docs/evaluation.md)" if "pte_over_lora_peak" in row else ""
        print(f"n={row['new_tokens']}: " + ", ".join(parts) + target, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[3072], help="new tokens per completion")
    ap.add_argument("--window", type=int, default=1024, help="thinking window of pte and lora_c")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (one prompt)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA / PTE adapter rank")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="test mode: a 2-layer Qwen2 (fp32 on CPU)")
    ap.add_argument("--tokenizer", default=DEFAULT_MODEL,
                    help="any model source; its tokenizer is used (default: the offline SmolLM2; random:<preset>: "
                         "the built-in byte tokenizer)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"),
                    help="where bench/rollout.py converts GGUF sources once")
    ap.add_argument("--max-rss-gib", type=float, default=64.0,
                    help="kill a worker whose host RSS exceeds this (default 64; our trainer loads fp32 weights)")
    ap.add_argument("--out", help="JSON path (default bench/results/gpu_memory_<device>.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                 "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    if args.worker:
        print(json.dumps(gpu_worker(args.worker, args.model_dir, args.lengths[0], args.window, args.group, args.rank,
                                    args.device)))
        return 0
    import torch

    if args.device == "cpu" and not args.tiny:
        print("bench/gpu_memory.py: --device cpu runs only with --tiny (the CPU benchmark is bench/train_memory.py).",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    name = _device_name(args.device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("_tiny" if args.tiny else "")
    out_path = args.out or f"bench/results/gpu_memory_{slug}.json"
    tokenizer_src = _local_model(args.tokenizer, Path(args.cache_dir))
    cap = int(args.max_rss_gib * GIB)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pte-gpu-bench-") as tmp:
        model = build_model(Path(tmp), args.tiny, dtype, tokenizer_src, args.device)
        print(f"{model['architecture']}: {model['parameters'] / 1e9:.3f} B parameters, random weights, {dtype}, "
              f"on {name}", flush=True)
        head = {"date": date.today().isoformat(), "device": args.device, "device_name": name,
                "platform": platform.platform(), "cuda": torch.version.cuda, "versions": _versions(),
                "command": " ".join(["python", "bench/gpu_memory.py", *(argv if argv is not None else sys.argv[1:])]),
                "model": model, "group": args.group, "rank": args.rank, "window": args.window,
                "memory": ("torch.cuda.max_memory_allocated over the step (reset before it), reserved beside it"
                           if args.device == "cuda" else "process RSS peak during the step (CPU test mode)"),
                "reward": "constant 0.0 in every arm", "max_rss_gib": args.max_rss_gib,
                "trl": "GRPOTrainer with its defaults (gradient_checkpointing=True), peft LoRA"}
        for n in args.lengths:
            for impl in args.impls:
                cmd = worker_cmd(impl, tmp, n, args.window, args.group, args.rank, args.device)
                r = {"impl": impl, "new_tokens": n, "window": args.window if impl in ("pte", "lora_c") else None,
                     **guarded(cmd, cap)}
                rows.append(r)
                _print_row(r)
                write_result(out_path, {**head, "runs": rows, "summary": summarize(rows, args.lengths)})  # partial
    summary = summarize(rows, args.lengths)
    _print_summary(summary)
    write_result(out_path, {**head, "runs": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
