"""One GRPO training step (rollout + replay + backward + update): peak memory and time, ours vs TRL.

Compares, on the same model, group size and generation length (EOS ignored so every completion has
exactly N tokens): our ``pte`` and ``lora_c`` (bounded cache, window W) and our full-cache ``lora``, and
TRL's ``GRPOTrainer`` with a peft LoRA of the same rank and targets. Each measurement runs in a fresh
subprocess; memory is the process RSS peak during the step on CPU (polled), ``max_memory_allocated`` on
GPU, with the RSS just before the step reported too. Prints the ratios and writes JSON.

The parent polls every worker's RSS and kills one that grows past ``--max-rss-gib`` (default 11 GiB, so a
shared machine is never pushed into the OOM killer); such a run is recorded as ``exceeded <cap> GiB RSS,
killed`` with ``peak_bytes`` = the cap, a lower bound, and the ratios it enters become bounds ("<= x").
``--parallel`` starts the impls of one length at the same time (for step-time ratios on a busy machine).
TRL runs with its own defaults (``gradient_checkpointing=True``, selective log-softmax); ``lora_gc`` is our full-cache
``lora`` with ``train.gradient_checkpointing`` on, the same recompute-in-backward setting.

    python bench/train_memory.py --lengths 2048 --window 256
    python bench/train_memory.py --lengths 512 --impls lora trl --parallel --out bench/results/x.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import DEFAULT_MODEL, PROMPT, PeakRSS, _local_model, write_result  # noqa: E402

IMPLS = ("pte", "lora_c", "lora", "lora_gc", "trl")  # lora_gc: our lora with train.gradient_checkpointing
GIB = 2**30


class StepMeter:
    """Time and peak memory of one block: the process RSS peak (polled) on CPU; on CUDA the allocator's peak.

    On CUDA, ``peak_bytes`` is ``max_memory_allocated`` reset on entry, after ``empty_cache`` so that blocks cached
    while loading (e.g. fp32 weights cast to bf16) do not count as reserved; ``reserved_peak_bytes`` is
    ``max_memory_reserved``. RSS is not polled there: the poller would contend for the GIL with kernel launches.
    """

    def __init__(self, device: str | None = None):
        self.cuda = device == "cuda"

    def __enter__(self) -> StepMeter:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self._rss = PeakRSS().__enter__()
            self.before = self._rss.peak
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        if not self.cuda:
            self._rss.__exit__(*exc)

    def result(self) -> dict:
        import torch

        if not self.cuda:
            return {"seconds": self.seconds, "peak_bytes": self._rss.peak, "rss_before_bytes": self.before}
        return {"seconds": self.seconds, "peak_bytes": torch.cuda.max_memory_allocated(),
                "allocated_before_bytes": self.before, "reserved_bytes": torch.cuda.memory_reserved(),
                "reserved_peak_bytes": torch.cuda.max_memory_reserved()}


def _params(model: str, n: int, window: int, group: int, rank: int, device: str | None = None,
            checkpointing: bool = False):
    """Our trainer's params for one step; ``device`` None keeps ``train.device: auto`` (CPU here, fp32);
    ``checkpointing``: ``train.gradient_checkpointing`` (recompute the full-cache replay's layers, as TRL does)."""
    from pte.config import params_from_dict

    where = {} if device is None else {"device": device, "precision": "bf16" if device == "cuda" else "fp32"}
    return params_from_dict({
        "model": {"source": model}, "cache": {"window": window}, "adapter": {"rank": rank, "alpha": 2.0 * rank},
        "pte": {"global_tokens": 32}, "data": {"allow_last_number": True},
        "train": {"steps": 1, "prompts_per_step": 1, "micro_batch": group, "save_every": 1000,
                  "gradient_checkpointing": checkpointing, "grpo": {"beta": 0.0, "loss_type": "dapo"},
                  "rollout": {"num_generations": group, "max_completion_length": n, "batch": group,
                              "check_replay": False},
                  **where}})


def _zero_reward(completions: list, *args, **kwargs) -> list[float]:
    """A constant reward, callable as our trainer's ``reward_fn(completions, answers)`` and as a TRL reward
    function (keyword arguments)."""
    return [0.0] * len(completions)


def _ours(method: str, model: str, n: int, window: int, group: int, rank: int, out: Path, device: str | None = None,
          zero_reward: bool = False) -> dict:
    import pte.training.train as train_mod

    train_mod.eos_ids = lambda model, tok: []  # exactly n tokens per completion, as TRL with min_new_tokens
    params = _params(model, n, window, group, rank, device, checkpointing=method == "lora_gc")
    trainer = train_mod.Trainer(params, method.removesuffix("_gc"), [PROMPT], ["42"], out,
                                reward_fn=_zero_reward if zero_reward else None)
    trainer.first_step = 0
    with StepMeter(device) as meter:
        metrics = trainer.train_step()
    assert metrics["completions/mean_length"] == n, metrics["completions/mean_length"]
    return {**meter.result(), "rollout_s": metrics["timing/rollout_s"], "update_s": metrics["timing/update_s"]}


def _trl(model: str, n: int, group: int, rank: int, out: Path, device: str | None = None) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from pte.engine.models import load_model

    cuda = device == "cuda"
    net, tok = load_model(model, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    net.requires_grad_(True)
    args = GRPOConfig(output_dir=str(out), use_cpu=not cuda, bf16=cuda, fp16=False, per_device_train_batch_size=group,
                      num_generations=group, max_completion_length=n, max_steps=1, report_to="none",
                      save_strategy="no", beta=0.0, loss_type="dapo", logging_steps=1, use_vllm=False,
                      generation_kwargs={"min_new_tokens": n}, temperature=1.0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}], "answer": "42"}] * group)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=net, processing_class=tok, reward_funcs=_zero_reward, args=args, train_dataset=data,
                          peft_config=lora)
    with StepMeter(device) as meter:
        trainer.train()
    return meter.result()


def worker(impl: str, model: str, n: int, window: int, group: int, rank: int, device: str | None = None,
           zero_reward: bool = False) -> dict:
    """One impl's training step in this process. ``device`` None: CPU as this script runs it (``train.device: auto``
    for ours); "cuda": bf16 on the GPU. ``zero_reward``: our trainer gets a constant reward, as TRL does here."""
    import tempfile

    import torch

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{impl}-"))
    res = (_trl(model, n, group, rank, out, device) if impl == "trl"
           else _ours(impl, model, n, window, group, rank, out, device, zero_reward))
    return {"impl": impl, "new_tokens": n, "window": window if impl in ("pte", "lora_c") else None, **res}


def guarded(cmd: list[str], cap: int, interval_s: float = 0.02, timeout_s: float | None = None) -> dict:
    """Run a worker, killing it when its RSS (with any children) exceeds ``cap`` bytes or it runs past ``timeout_s``.

    Returns the worker's JSON, ``{"result": "exceeded <cap> GiB RSS, killed", "peak_bytes": cap, ...}``, or
    ``{"result": "timed out after <t> s, killed", "timed_out": True, ...}``.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    ps, seen, killed, late = psutil.Process(proc.pid), 0, False, False
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            rss = 0
        seen = max(seen, rss)
        late = timeout_s is not None and time.perf_counter() - start > timeout_s
        if rss > cap or late:
            for c in ps.children(recursive=True):
                c.kill()
            proc.kill()
            killed = not late
            break
        time.sleep(interval_s)
    proc.wait()
    for t in readers:
        t.join()
    wall = time.perf_counter() - start
    gib = cap / GIB
    if late:
        return {"result": f"timed out after {timeout_s:.0f} s, killed", "timed_out": True, "wall_s": wall}
    if killed:
        return {"result": f"exceeded {gib:g} GiB RSS, killed", "peak_bytes": max(cap, seen),
                "peak_is_lower_bound": True, "wall_s": wall}
    if proc.returncode:
        print(out.get("stderr", "")[-3000:], file=sys.stderr)
        return {"result": f"failed with exit code {proc.returncode}", "wall_s": wall,
                "stderr_tail": out.get("stderr", "")[-1500:]}
    return {**json.loads(out["stdout"].strip().splitlines()[-1]), "worker_wall_s": wall, "parent_polled_peak": seen}


def _ratio(num: dict | None, den: dict | None, key: str) -> dict:
    """``num[key] / den[key]`` with its kind: exact, ``<=`` (denominator is a lower bound), ``>=`` or unknown."""
    if not num or not den or key not in num or key not in den:
        return {}
    lo_num, lo_den = num.get("peak_is_lower_bound", False), den.get("peak_is_lower_bound", False)
    if key == "seconds" and (lo_num or lo_den):
        return {}
    if lo_num and lo_den:
        return {"value": None, "text": "unknown (both killed)"}
    value = num[key] / den[key]
    op = "<= " if lo_den else ">= " if lo_num else ""
    return {"value": value, "bound": op.strip() or "=", "text": f"{op}{value:.3f}"}


def summarize(rows: list[dict], lengths: list[int]) -> list[dict]:
    """Per length: pte/lora, pte/lora_gc and pte/trl peak, lora/trl and lora_gc/trl step time; a killed run makes
    its ratio a bound."""
    summary = []
    for n in lengths:
        by = {r["impl"]: r for r in rows if r["new_tokens"] == n and ("seconds" in r or "peak_is_lower_bound" in r)}
        row: dict = {"new_tokens": n}
        for name, num, den, key in (("pte_over_lora_peak", "pte", "lora", "peak_bytes"),
                                    ("pte_over_trl_peak", "pte", "trl", "peak_bytes"),
                                    ("lora_c_over_lora_peak", "lora_c", "lora", "peak_bytes"),
                                    ("pte_over_lora_gc_peak", "pte", "lora_gc", "peak_bytes"),
                                    ("lora_over_trl_time", "lora", "trl", "seconds"),
                                    ("lora_gc_over_trl_time", "lora_gc", "trl", "seconds")):
            r = _ratio(by.get(num), by.get(den), key)
            if r:
                row[name] = r["value"]
                row[name + "_text"] = r["text"]
        summary.append(row)
    return summary


def _result(args, argv: list[str] | None, rows: list[dict], summary: list[dict]) -> dict:
    return {"date": date.today().isoformat(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "model": args.model, "group": args.group, "rank": args.rank, "window": args.window,
            "memory": "process RSS peak during the step (CPU)", "max_rss_gib": args.max_rss_gib,
            "parallel": args.parallel, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "trl": "GRPOTrainer with its defaults (gradient_checkpointing=True), peft LoRA, use_cpu",
            "command": " ".join(["python", "bench/train_memory.py", *(argv if argv is not None else sys.argv[1:])]),
            "runs": rows, "summary": summary}


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
    ap.add_argument("--max-rss-gib", type=float, default=11.0,
                    help="kill a worker whose RSS exceeds this and record it as a lower bound (default 11)")
    ap.add_argument("--parallel", action="store_true", help="run the impls of each length at the same time")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.lengths[0], args.window, args.group, args.rank)))
        return 0
    model = _local_model(args.model, Path(args.cache_dir))
    cap = int(args.max_rss_gib * GIB)
    rows = []
    for n in args.lengths:
        cmds = {impl: [sys.executable, __file__, "--worker", impl, "--model", model, "--lengths", str(n), "--window",
                       str(args.window), "--group", str(args.group), "--rank", str(args.rank)]
                for impl in args.impls}
        groups = [list(args.impls)] if args.parallel else [[impl] for impl in args.impls]
        for group in groups:
            results: dict[str, dict] = {}
            threads = [threading.Thread(target=lambda i=impl, res=results, c=cmds: res.__setitem__(
                i, guarded(c[i], cap))) for impl in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for impl in group:
                r = {"impl": impl, "new_tokens": n, "window": args.window if impl in ("pte", "lora_c") else None,
                     **results[impl]}
                if args.parallel:
                    r["run_alongside"] = [i for i in group if i != impl]
                rows.append(r)
                if "seconds" in r:
                    print(f"{impl:7s} n={n:5d}  step {r['seconds']:7.1f} s  peak {r['peak_bytes'] / 2**20:8.1f} MiB "
                          f"(before step {r['rss_before_bytes'] / 2**20:7.1f} MiB)", flush=True)
                else:
                    print(f"{impl:7s} n={n:5d}  {r['result']} after {r['wall_s']:.0f} s", flush=True)
            write_result(args.out, _result(args, argv, rows, summarize(rows, args.lengths)))  # partial, kept on a crash
    summary = summarize(rows, args.lengths)
    for row in summary:
        print(json.dumps(row))
    write_result(args.out, _result(args, argv, rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
