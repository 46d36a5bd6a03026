"""The GPU benchmarks in one command: rollout speed, MFU and memory, and one training step's memory, under a deadline.

On one CUDA GPU, on the random-weight Qwen2.5-3B architecture in bf16 (no download: ``bench/gpu_memory.py``'s
``build_model``, the offline SmolLM2 tokenizer), it runs these parts in this order, each worker in its own process
(``bench/rollout.py``'s and ``bench/gpu_memory.py``'s workers, unchanged):

==============  ==========================================================================================
``rollout:grpo``   the GRPO shape (``bench/rollout.py --shape grpo``): 8 ``var_chain`` prompts x 4 samples, 128
                   new tokens, window 32, T = 1, shared prefill; bounded engine, the same with compiled decode
                   (``cache.compile_decode``, CUDA graphs; not with ``--tiny``) and HF ``generate``: tokens/s, x HF,
                   % of the GEMM roofline (an 8192^3 bf16 matmul timed in the same worker)
``train:pte``      one GRPO step of ``pte`` (rollout 3072 tokens, window 1024, group 4): peak memory and time
``train:lora``     the same step with the full-cache ``lora``: the pte / lora peak ratio (target <= 0.55)
``rollout:bench``  the bench shape: 4 copies of one prompt, greedy, window 128, 512 new tokens; bounded vs HF
``train:trl``      TRL's ``GRPOTrainer`` step (its defaults, gradient checkpointing on)
``train:lora_c``   the bounded-cache ``lora_c`` step
``rollout:flat``   the bounded engine at 4096 new tokens in the bench shape: peak and working memory against
                   ``rollout:bench``'s 512 (flat: < 5% growth)
==============  ==========================================================================================

Time: ``--deadline-s`` (480) counts from the start, the model build included. A part starts only when at least its
minimum time is left (``--min-part-s``: 30 s for a rollout part, 60 s for a training part, 0 with ``--tiny``); every
worker is killed at the deadline or after ``--worker-timeout-s``. Parts left out by ``--parts``, skipped for the
deadline or for a missing package, killed, or failed are recorded as such in the JSON, which is rewritten after every
part (a crash keeps what was measured). The JSON (default ``bench/results/gpu_suite_<device>.json``) holds the
device, torch / CUDA / library versions, the date, the command, every run's numbers and the summaries; a table is
printed at the end.

``--tiny --device cpu`` runs the same code paths with a 2-layer model (Qwen2.5's vocabulary kept) in fp32 on the
CPU and small sizes (16 new tokens, window 8; 256^3 GEMM), for tests: under a minute on two cores. Without
``--tiny`` it needs CUDA and exits with status 2 elsewhere.

    python bench/gpu_suite.py                                  # on a GPU machine: ~8 minutes
    python bench/gpu_suite.py --parts train:trl train:lora_c rollout:flat --out bench/results/gpu_suite_2.json
    python bench/gpu_suite.py --tiny --device cpu --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout as rollout_bench  # noqa: E402
from gpu_memory import _device_name, _print_summary, _versions, build_model  # noqa: E402
from gpu_memory import worker_cmd as train_cmd  # noqa: E402
from train_memory import GIB, guarded, summarize  # noqa: E402

PARTS = ("rollout:grpo", "train:pte", "train:lora", "rollout:bench", "train:trl", "train:lora_c", "rollout:flat")
TINY_PARTS = ("rollout:grpo", "train:pte", "train:lora", "rollout:bench", "rollout:flat")
NEEDS = {"rollout": ("torch", "transformers"), "train": ("torch", "transformers", "peft", "deepspeed"),
         "train:trl": ("torch", "transformers", "peft", "trl", "datasets")}
"""Python packages each kind of part imports (a missing one skips the part instead of failing it)."""
NO_CUDA = ("bench/gpu_suite.py needs a CUDA GPU; found none. Run it on a GPU machine: python bench/gpu_suite.py "
           "(to test the code path on CPU instead: --tiny --device cpu).")


def sizes(tiny: bool) -> dict:
    """Every part's shape: the real one on a GPU, a small one with ``--tiny``."""
    if tiny:
        return {"grpo": {"shape": "grpo", "prompts": 8, "batch": 32, "window": 8, "new_tokens": 16, "temperature": 1.0,
                         "gemm_size": 256},
                "bench": {"shape": "bench", "prompts": 1, "batch": 4, "window": 8, "new_tokens": 16,
                          "temperature": 0.0, "gemm_size": 0},
                "flat_tokens": 32, "train": {"new_tokens": 16, "window": 8, "group": 4, "rank": 8}}
    return {"grpo": {"shape": "grpo", "prompts": 8, "batch": 32, "window": 32, "new_tokens": 128, "temperature": 1.0,
                     "gemm_size": 8192},
            "bench": {"shape": "bench", "prompts": 1, "batch": 4, "window": 128, "new_tokens": 512,
                      "temperature": 0.0, "gemm_size": 0},
            "flat_tokens": 4096, "train": {"new_tokens": 3072, "window": 1024, "group": 4, "rank": 8}}


def missing_packages(part: str) -> list[str]:
    needs = NEEDS.get(part) or NEEDS[part.split(":")[0]]
    return [m for m in needs if importlib.util.find_spec(m) is None]


class Deadline:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _status(rows: list[dict]) -> str:
    """A part's status from its workers' rows: the worst of failed, timed out, partly skipped, done."""
    if any(str(r.get("result", "")).startswith("failed") for r in rows):
        return "failed"
    if any(r.get("timed_out") for r in rows):
        return "timed out"
    if any(r.get("skipped") for r in rows):
        return "partly skipped: deadline"
    return "done"


def run_part(part: str, cfg: dict, model_dir: str, args, deadline: Deadline, cap: int, result: dict) -> list[dict]:
    """The workers of one part, each killed at the deadline or after ``--worker-timeout-s``; rows go into ``result``."""
    kind, name = part.split(":")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if kind == "rollout":
        spec = cfg["bench"] if name in ("bench", "flat") else cfg["grpo"]
        n = cfg["flat_tokens"] if name == "flat" else spec["new_tokens"]
        impls = ["bounded"] if name == "flat" else ["bounded", "hf"]
        if name == "grpo" and not args.tiny:  # compiled decode (CUDA graphs); its compile is too slow for --tiny tests
            impls = ["bounded", "compiled", "hf"]
        jobs = [(impl, rollout_bench.worker_cmd(impl, model_dir, n, {**spec, "gemm_size": spec["gemm_size"] if i == 0
                                                                     else 0}, args.device, dtype))
                for i, impl in enumerate(impls)]
    else:
        t = cfg["train"]
        n = t["new_tokens"]
        jobs = [(name, train_cmd(name, model_dir, n, t["window"], t["group"], t["rank"], args.device))]
    rows = []
    for impl, cmd in jobs:
        timeout = min(deadline.left(), args.worker_timeout_s)
        if timeout <= 0:
            r = {"result": "skipped: deadline", "skipped": True}
        else:
            r = guarded(cmd, cap, timeout_s=timeout)
        row = {"impl": impl, "new_tokens": n, "part": part, **r}
        if kind == "train":
            row.setdefault("window", cfg["train"]["window"] if impl in ("pte", "lora_c") else None)
        rows.append(row)
        _print_run(kind, row)
        if kind == "rollout":
            result["rollout"]["grpo" if name == "grpo" else "bench"]["runs"].append(row)
        else:
            result["train"]["runs"].append(row)
    return rows


def _print_run(kind: str, r: dict) -> None:
    if kind == "rollout" and "tokens_per_s" in r:
        mfu = f"  {100 * r['mfu']:.2f}% of roofline" if "mfu" in r else ""
        print(f"  {r['impl']:8s} n={r['new_tokens']:5d}  {r['tokens_per_s']:9.1f} tok/s  peak "
              f"{r['peak_bytes'] / GIB:6.2f} GiB{mfu}", flush=True)
    elif kind == "train" and "seconds" in r:
        print(f"  {r['impl']:8s} n={r['new_tokens']:5d}  step {r['seconds']:7.1f} s  peak "
              f"{r['peak_bytes'] / GIB:6.2f} GiB", flush=True)
    else:
        print(f"  {r['impl']:8s} n={r['new_tokens']:5d}  {r.get('result', '?')}", flush=True)


def finish(result: dict, cfg: dict) -> None:
    """Summaries of what has been measured so far: MFU against the roofline, speed ratios, memory growth, train
    ratios."""
    roof = next((r["roofline"] for r in result["rollout"]["grpo"]["runs"] if "roofline" in r), None)
    result["roofline"] = roof
    for shape in ("grpo", "bench"):
        block = result["rollout"][shape]
        runs = [r for r in block["runs"] if "tokens_per_s" in r]
        if roof:
            for r in runs:
                if "mfu" not in r:
                    rollout_bench.apply_roofline(r, roof)
        lengths = sorted({r["new_tokens"] for r in runs}) or [0]
        block["summary"], block["peak_growth"], block["working_growth"] = rollout_bench.summarize(
            runs, lengths, ["bounded", "compiled", "full", "hf"])
    n = cfg["train"]["new_tokens"]
    result["train"]["summary"] = summarize([r for r in result["train"]["runs"] if "skipped" not in r], [n])


def print_report(result: dict) -> None:
    m = result["model"]
    print(f"\n== bench/gpu_suite.py on {result['device_name']} ({result['device']}), torch {result['torch']}, "
          f"CUDA {result['cuda']}, {result['date']}")
    print(f"   {m['architecture']}, {m['parameters'] / 1e9:.3f} B parameters, random weights, {m['dtype']}; "
          f"wall {result['wall_s']:.0f} s of a {result['deadline_s']:.0f} s deadline "
          f"(model build {m['build_s']:.0f} s)")
    print(f"\n{'part':15s} {'status':28s} {'seconds':>8s}")
    for p in result["parts"]:
        print(f"{p['name']:15s} {p['status']:28s} {p.get('seconds', 0.0):8.1f}")
    for shape, title in (("grpo", "rollout, GRPO shape"), ("bench", "rollout, bench shape")):
        block = result["rollout"][shape]
        if block["runs"]:
            s = result["settings"][shape]
            print(f"\n{title}: {s['batch']} rows = {s['prompts']} prompt(s) x {s['batch'] // s['prompts']}, window "
                  f"{s['window']}, T = {s['temperature']:g}")
            rollout_bench.print_table(block["runs"], block["peak_growth"], block["working_growth"])
    runs = result["train"]["runs"]
    if runs:
        t = result["settings"]["train"]
        print(f"\ntraining step: rollout {t['new_tokens']} tokens, window {t['window']}, group {t['group']}, "
              f"rank {t['rank']}")
        print(f"{'impl':8s} {'step s':>8s} {'rollout s':>10s} {'update s':>9s} {'peak GiB':>9s} {'reserved GiB':>13s}")
        for r in runs:
            if "seconds" not in r:
                print(f"{r['impl']:8s} {r.get('result', '?')}")
                continue
            cells = [f"{r['seconds']:.1f}", f"{r.get('rollout_s', float('nan')):.1f}",
                     f"{r.get('update_s', float('nan')):.1f}", f"{r['peak_bytes'] / GIB:.2f}",
                     f"{r['reserved_peak_bytes'] / GIB:.2f}" if "reserved_peak_bytes" in r else "-"]
            print(f"{r['impl']:8s} {cells[0]:>8s} {cells[1]:>10s} {cells[2]:>9s} {cells[3]:>9s} {cells[4]:>13s}")
        _print_summary(result["train"]["summary"])


def _save(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="test mode: a 2-layer Qwen2 in fp32, small sizes")
    ap.add_argument("--parts", nargs="+", choices=PARTS, help=f"default: all ({' '.join(PARTS)}); with --tiny: "
                                                               f"{' '.join(TINY_PARTS)}")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="wall-clock budget of the whole suite")
    ap.add_argument("--min-part-s", type=float, nargs=2, metavar=("ROLLOUT", "TRAIN"),
                    help="least time left to start a rollout / training part (default 30 60; 0 0 with --tiny)")
    ap.add_argument("--worker-timeout-s", type=float, default=240.0, help="kill any one worker after this")
    ap.add_argument("--tokenizer", default=rollout_bench.DEFAULT_MODEL,
                    help="any model source; its tokenizer is used (default: the offline SmolLM2)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"))
    ap.add_argument("--max-rss-gib", type=float, default=64.0, help="kill a worker whose host RSS exceeds this")
    ap.add_argument("--out", help="JSON path (default bench/results/gpu_suite_<device>.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    deadline = Deadline(args.deadline_s)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                 "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import torch

    if args.device == "cpu" and not args.tiny:
        print("bench/gpu_suite.py: --device cpu runs only with --tiny (the CPU benchmarks are bench/rollout.py and "
              "bench/train_memory.py).", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    cfg = sizes(args.tiny)
    selected = args.parts or (TINY_PARTS if args.tiny else PARTS)
    min_rollout, min_train = args.min_part_s or ((0.0, 0.0) if args.tiny else (30.0, 60.0))
    name = _device_name(args.device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("_tiny" if args.tiny else "")
    out_path = args.out or f"bench/results/gpu_suite_{slug}.json"
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    result: dict = {
        "suite": "bench/gpu_suite.py", "date": date.today().isoformat(),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"), "device": args.device,
        "device_name": name, "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "versions": _versions(),
        "command": " ".join(["python", "bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny, "deadline_s": args.deadline_s, "worker_timeout_s": args.worker_timeout_s,
        "settings": {"grpo": cfg["grpo"], "bench": {**cfg["bench"], "flat_tokens": cfg["flat_tokens"]},
                     "train": cfg["train"]},
        "memory": ("rollout: torch.cuda.max_memory_allocated over the generation; train: over the step (reset before "
                   "it), reserved beside it" if args.device == "cuda" else "process RSS peaks (CPU test mode)"),
        "parts": [], "rollout": {"grpo": {"runs": []}, "bench": {"runs": []}}, "train": {"runs": []},
    }
    tokenizer_src = rollout_bench._local_model(args.tokenizer, Path(args.cache_dir))
    cap = int(args.max_rss_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="pte-gpu-suite-") as tmp:
        start = time.perf_counter()
        result["model"] = {**build_model(Path(tmp), args.tiny, dtype, tokenizer_src, args.device),
                           "build_s": time.perf_counter() - start}
        print(f"{result['model']['architecture']}: {result['model']['parameters'] / 1e9:.3f} B parameters, random "
              f"weights, {dtype}, on {name}; built in {result['model']['build_s']:.0f} s", flush=True)
        for part in PARTS:
            entry: dict = {"name": part}
            minimum = min_rollout if part.startswith("rollout") else min_train
            missing = missing_packages(part)
            if part not in selected:
                entry["status"] = "not selected"
            elif missing:
                entry["status"] = f"skipped: missing {', '.join(missing)}"
            elif deadline.left() < max(minimum, 1e-9):
                entry["status"] = "skipped: deadline"
                entry["left_s"] = deadline.left()
            else:
                print(f"{part} ({deadline.left():.0f} s left)", flush=True)
                begin = time.perf_counter()
                rows = run_part(part, cfg, tmp, args, deadline, cap, result)
                entry.update({"status": _status(rows), "seconds": time.perf_counter() - begin})
            result["parts"].append(entry)
            result["wall_s"] = deadline.elapsed()
            finish(result, cfg)
            _save(out_path, result)  # partial, kept on a crash
    result["wall_s"] = deadline.elapsed()
    finish(result, cfg)
    print_report(result)
    rollout_bench.write_result(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
