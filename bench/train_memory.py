"""One GRPO training step (rollout + replay + backward + update): peak memory and time, ours vs TRL.

Compares, on the same model, group size and generation length (EOS ignored so every completion has
exactly N tokens): our ``pte`` and ``lora_c`` (bounded cache, window W) and our full-cache ``lora``, and
TRL's ``GRPOTrainer`` with a peft LoRA of the same rank and targets. Each measurement runs in a fresh
subprocess; memory is the process RSS peak during the step on CPU (polled), ``max_memory_allocated`` on
GPU, with the RSS just before the step reported too. Prints the ratios and writes JSON.

    python bench/train_memory.py --lengths 2048 --window 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import DEFAULT_MODEL, PROMPT, PeakRSS, _local_model, write_result  # noqa: E402

IMPLS = ("pte", "lora_c", "lora", "trl")


def _params(model: str, n: int, window: int, group: int, rank: int):
    from pte.config import params_from_dict

    return params_from_dict({
        "model": {"source": model}, "cache": {"window": window}, "adapter": {"rank": rank, "alpha": 2.0 * rank},
        "pte": {"global_tokens": 32},
        "grpo": {"num_generations": group, "max_completion_length": n, "beta": 0.0, "loss_type": "dapo",
                 "allow_last_number": True},
        "train": {"steps": 1, "prompts_per_step": 1, "rollout_batch": group, "micro_batch": group,
                  "check_replay": False, "save_every": 1000}})


def _ours(method: str, model: str, n: int, window: int, group: int, rank: int, out: Path) -> dict:
    import pte.train as train_mod

    train_mod.eos_ids = lambda model, tok: []  # exactly n tokens per completion, as TRL with min_new_tokens
    trainer = train_mod.Trainer(_params(model, n, window, group, rank), method, [PROMPT], ["42"], out)
    trainer.first_step = 0
    with PeakRSS() as rss:
        before = rss.peak
        start = time.perf_counter()
        metrics = trainer.train_step()
        seconds = time.perf_counter() - start
    assert metrics["completions/mean_length"] == n, metrics["completions/mean_length"]
    return {"seconds": seconds, "peak_bytes": rss.peak, "rss_before_bytes": before,
            "rollout_s": metrics["timing/rollout_s"], "update_s": metrics["timing/update_s"]}


def _trl(model: str, n: int, group: int, rank: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from pte.models import load_model

    net, tok = load_model(model)
    net.requires_grad_(True)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=group,
                      num_generations=group, max_completion_length=n, max_steps=1, report_to="none",
                      save_strategy="no", beta=0.0, loss_type="dapo", logging_steps=1, use_vllm=False,
                      generation_kwargs={"min_new_tokens": n}, temperature=1.0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}], "answer": "42"}] * group)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=net, processing_class=tok, reward_funcs=lambda completions, **kw: [0.0] * len(
        completions), args=args, train_dataset=data, peft_config=lora)
    with PeakRSS() as rss:
        before = rss.peak
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": rss.peak, "rss_before_bytes": before}


def worker(impl: str, model: str, n: int, window: int, group: int, rank: int) -> dict:
    import tempfile

    import torch

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{impl}-"))
    res = _trl(model, n, group, rank, out) if impl == "trl" else _ours(impl, model, n, window, group, rank, out)
    return {"impl": impl, "new_tokens": n, "window": window if impl in ("pte", "lora_c") else None, **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--out", default="bench/results/train_memory_cpu.json")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.lengths[0], args.window, args.group, args.rank)))
        return 0
    model = _local_model(args.model, Path(args.cache_dir))
    rows = []
    for n in args.lengths:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--worker", impl, "--model", model, "--lengths", str(n), "--window",
                   str(args.window), "--group", str(args.group), "--rank", str(args.rank)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{impl} at {n} tokens failed")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{impl:7s} n={n:5d}  step {r['seconds']:7.1f} s  peak {r['peak_bytes'] / 2**20:8.1f} MiB "
                  f"(before step {r['rss_before_bytes'] / 2**20:7.1f} MiB)", flush=True)
    by = {(r["impl"], r["new_tokens"]): r for r in rows}
    summary = []
    for n in args.lengths:
        pte, lora, trl = by.get(("pte", n)), by.get(("lora", n)), by.get(("trl", n))
        row = {"new_tokens": n}
        if pte and lora:
            row["pte_over_lora_peak"] = pte["peak_bytes"] / lora["peak_bytes"]
        if pte and trl:
            row["pte_over_trl_peak"] = pte["peak_bytes"] / trl["peak_bytes"]
        if lora and trl:
            row["lora_over_trl_time"] = lora["seconds"] / trl["seconds"]
        summary.append(row)
        print(json.dumps(row))
    result = {"date": date.today().isoformat(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "model": args.model, "group": args.group, "rank": args.rank, "window": args.window,
              "memory": "process RSS peak during the step (CPU)", "runs": rows, "summary": summary}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
