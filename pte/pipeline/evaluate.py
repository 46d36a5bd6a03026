"""Evaluation: accuracy and pass@k of every method under every cache budget; memory accounting; reports.

What it does:
    * Pure statistics: :func:`pass_at_k` (the unbiased estimator of Chen et al. 2021), :func:`bootstrap_ci`
      (percentile bootstrap over problems) and :func:`summarize` (per-sample records -> metrics).
    * :func:`evaluate_policy`: n samples per problem from one loaded policy under one total cache budget C (prompt
      block P + thinking window W = C - P, the sliding-window eviction of docs/method.md, "Bounded cache", the same
      ratio for every method) or the full cache, each scored by the one oracle :func:`pte.data.rewards.score`.
    * :func:`evaluate_all`: every method x every budget -> ``metrics.json``, ``samples/*.jsonl``, plots
    (``pte.pipeline.plots``).
    * :func:`metrics_table`: methods x budgets as a markdown table (reports, Prefect artifacts).

Protocol (paper §3): accuracy = pass@1 averaged over n samples per problem (mean over problems of c/n),
sampled at T = 0.6, top-p 0.95 by default; pass@k with the unbiased estimator when n > k.

Budgets: a problem whose own prompt needs C slots or more leaves no thinking window; it is skipped and counted as
``over_budget`` (never as wrong; accuracy is over the problems that fit). The others are batched in order of prompt
length, so each batch's padded prompt block P stays below C and rows get a window close to C - (own prompt).

Memory: ``kv_cache_peak_bytes`` is analytic and device-independent: the most KV slots a batch held at once x layers x
2 (K and V) x kv_heads x head_dim x dtype bytes x rows, maximised over batches (PTE's O(L G r) state is not included).
``peak_memory_bytes`` is measured: on CUDA ``torch.cuda.max_memory_allocated`` during this evaluation (weights
included); on CPU the process's peak RSS (``ru_maxrss``), a high-water mark of the whole process that is never reset,
so on CPU only ``kv_cache_peak_bytes`` compares budgets. ``process_peak_rss_bytes`` is that RSS on any device.

It knows nothing about training, tracking or Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pte.config import CacheConfig, EvalConfig
from pte.config.numerics import derive_seed
from pte.data.rewards import extract_answer, score
from pte.data.rows import DataConfig, Row, format_prompt, write_json
from pte.data.tasks import recall_score
from pte.engine.inference import Generator, completion_ids, decode_completion, encode_prompts, eos_ids
from pte.engine.rollout import generate
from pte.training.runtime import process_peak_rss_bytes

__all__ = ["batch_seed", "bootstrap_ci", "budget_label", "evaluate_all", "evaluate_policy", "kv_bytes_per_token",
           "metrics_table", "pass_at_k", "plan_batches", "summarize"]

log = logging.getLogger(__name__)

Record = dict[str, Any]


_MEASURED = ("seconds", "peak_memory_bytes", "process_peak_rss_bytes")


def budget_label(budget: int | None) -> str:
    """``"full"`` for the full cache, else ``str(C)``: the key of a budget in ``metrics.json`` and file names."""
    return "full" if budget is None else str(budget)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021).

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the (huge) binomials.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, ci: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the problems with replacement ``n_resamples`` times.

    Args:
        values: ``[N]`` per-problem scores (e.g. c/n). n_resamples: resamples. ci: confidence level in (0, 1).
        seed: seed of the ``numpy.random.Generator``; the same seed gives the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when there are no values or no resamples.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or n_resamples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)  # [n_resamples]
    low, high = np.quantile(means, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(low), float(high)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def summarize(records: Sequence[Record], pass_k: Sequence[int] = (1,), n_resamples: int = 1000, ci: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Metrics of per-sample records (each with ``id``, ``correct``, ``length``, ``finished``, ``evictions``).

    Returns:
        ``accuracy`` (mean over problems of c/n = pass@1 averaged over samples), ``accuracy_ci_low/high`` (bootstrap
        over problems), ``pass@k`` for every k that every problem has enough samples for, ``mean_length`` (generated
        tokens), ``median_length``, ``truncation_rate`` (share of samples not ended by EOS), ``boxed_rate`` (share of
        completions with a ``\\boxed{`` answer), ``mixed_groups`` (share of problems with >= 2 samples whose samples
        are neither all right nor all wrong: the groups in which GRPO gets a signal), ``evictions_per_sample``,
        ``num_problems``, ``num_samples``, and ``recall_accuracy``: the share of values recalled from early variables
        that the completions wrote correctly (:func:`pte.data.tasks.recall_score`; None when no record has a recall).
        Means over no records are None.
    """
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(str(r["id"]), []).append(bool(r["correct"]))
    counts = [(len(g), sum(g)) for g in groups.values()]  # (n, c) per problem
    per_problem = [c / n for n, c in counts]
    low, high = bootstrap_ci(per_problem, n_resamples, ci, seed)
    out: dict[str, Any] = {"accuracy": _mean(per_problem), "accuracy_ci_low": _finite(low),
                           "accuracy_ci_high": _finite(high)}
    for k in pass_k:
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = _mean([pass_at_k(n, c, k) for n, c in counts])
    lengths = [float(r["length"]) for r in records]
    out.update(mean_length=_mean(lengths), median_length=float(np.median(lengths)) if lengths else None,
               truncation_rate=_mean([0.0 if r["finished"] else 1.0 for r in records]),
               boxed_rate=_mean([1.0 if "\\boxed{" in r.get("completion", "") else 0.0 for r in records]),
               mixed_groups=_mean([1.0 if 0 < c < n else 0.0 for n, c in counts if n >= 2]),
               evictions_per_sample=_mean([float(r["evictions"]) for r in records]),
               num_problems=len(groups), num_samples=len(records))
    recalls = sum(int(r.get("recall_total", 0)) for r in records)
    out["recall_accuracy"] = sum(int(r.get("recall_correct", 0)) for r in records) / recalls if recalls else None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Batching, seeds, memory


def plan_batches(prompt_lengths: Sequence[int], budget: int | None,
                 problems_per_batch: int) -> tuple[list[list[int]], list[int]]:
    """Group problems into generation batches whose padded prompt block fits the budget.

    Args:
        prompt_lengths: ``[N]`` token count of each problem's templated prompt.
        budget: total cache slots C, or None for the full cache.
        problems_per_batch: whole problems per batch.

    Returns:
        ``(batches, over_budget)``: lists of problem indices, batches in order of prompt length (ties by index), and
        the indices of problems whose prompt alone needs ``>= C`` slots (no room for a thinking token).
    """
    over = [i for i, n in enumerate(prompt_lengths) if budget is not None and n >= budget]
    skip = set(over)
    fits = sorted((i for i in range(len(prompt_lengths)) if i not in skip), key=lambda i: (prompt_lengths[i], i))
    step = max(1, problems_per_batch)
    return [fits[s : s + step] for s in range(0, len(fits), step)], over


def batch_seed(seed: int, budget: int | None, index: int) -> int:
    """Seed of generation batch ``index`` under ``budget`` (:func:`pte.config.numerics.derive_seed`), the same for
    every method (common random numbers across methods)."""
    return derive_seed(seed, "eval", budget_label(budget), index)


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """KV-cache bytes of one token slot: layers x 2 x kv_heads x head_dim x dtype bytes."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).dtype.itemsize)


def _prompt_lengths(tokenizer, prompts: list[str], system: str | None, chunk: int = 256) -> list[int]:
    lengths: list[int] = []
    for s in range(0, len(prompts), chunk):
        _, mask = encode_prompts(tokenizer, prompts[s : s + chunk], system=system)
        lengths.extend(int(n) for n in mask.sum(-1))
    return lengths


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def _generate_batch(generator: Generator, rows: list[Row], prompts: list[str], cache: CacheConfig, cfg: EvalConfig,
                    data_cfg: DataConfig, seed: int) -> tuple[list[Record], int]:
    """n samples of each problem of one batch; returns their records and the batch's peak KV slots."""
    n, tok = cfg.num_samples, generator.tokenizer
    ids, mask = encode_prompts(tok, [p for p in prompts for _ in range(n)], device=generator.device,
                               system=data_cfg.system_prompt)  # [B*n, P]
    eos = eos_ids(generator.model, tok)
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    out = generate(generator.model, ids, mask, cache, cfg.sampling(), eos, tok.pad_token_id, generator=rng)
    own = mask.sum(-1).tolist()
    records = []
    for b, token_ids in enumerate(completion_ids(out)):
        row = rows[b // n]
        text = decode_completion(tok, token_ids, eos)
        recalled, recalls = recall_score(row.problem, text)
        records.append({
            "id": row.id, "source": row.source, "method": generator.method, "budget": cache.budget, "sample": b % n,
            "completion": text, "answer": row.answer,
            "extracted": extract_answer(text, allow_last_number=data_cfg.allow_last_number),
            "correct": score(text, row.answer, allow_last_number=data_cfg.allow_last_number) == 1.0,
            "length": len(token_ids), "finished": bool(out.finished[b]), "evictions": int(out.num_evictions[b]),
            "prompt_tokens": int(own[b]), "prompt_block": out.plan.prompt_len, "window": out.plan.window,
            "cache_peak_tokens": out.max_cache_tokens,
            "recall_correct": recalled, "recall_total": recalls,
        })
    return records, out.max_cache_tokens


def _warn_over_budget(budget: int | None, over: list[int], rows: list[Row], lengths: list[int]) -> None:
    if not over:
        return
    ids = ", ".join(f"{rows[i].id} ({lengths[i]} tokens)" for i in over[:5]) + (" ..." if len(over) > 5 else "")
    log.warning("budget C=%s: %d of %d problems have a prompt of >= %s tokens, leaving no thinking window; they are "
                "skipped and reported as over_budget, not counted as wrong (%s). Raise the budget above the longest "
                "prompt to evaluate them.", budget, len(over), len(rows), budget, ids)


def evaluate_policy(generator: Generator, rows: list[Row], budget: int | None, cfg: EvalConfig, data_cfg: DataConfig,
                    seed: int, progress: bool = True, cache: CacheConfig | None = None
                    ) -> tuple[dict[str, Any], list[Record]]:
    """Sample ``cfg.num_samples`` completions per problem under one cache budget and score them.

    Args:
        generator: a loaded policy; ``generator.method`` labels the records.
        rows: problems (the first ``cfg.max_problems`` are used).
        budget: total cache slots C = prompt block + thinking window, or None for the full cache.
        cfg: the ``evaluate`` section. data_cfg: prompt template, system prompt and answer oracle.
        seed: the run seed; batch b samples from ``torch.Generator`` seeded with ``batch_seed(seed, budget, b)``.
        progress: tqdm bar over problems (running accuracy in its postfix) and a printed duration.
        cache: the ``cache`` section, whose eviction rule and decode setting every budget uses (default:
            ``CacheConfig()``'s).

    Returns:
        ``(metrics, records)``: :func:`summarize`'s metrics plus ``over_budget``, ``over_budget_ids``, ``seconds``,
        ``kv_cache_bytes_per_token``, ``kv_cache_peak_bytes``, ``peak_memory_bytes``, ``process_peak_rss_bytes``
        (see the module docstring), ``ci_level``; records (one per sample, in problem then sample order) hold
        ``id, source, method, budget, sample, completion, answer, extracted, correct, length, finished, evictions,
        prompt_tokens, prompt_block, window, cache_peak_tokens``.
    """
    from tqdm.auto import tqdm

    rows = list(rows[: cfg.max_problems] if cfg.max_problems else rows)
    cache = (cache or CacheConfig()).for_budget(budget)
    start, device = time.perf_counter(), generator.device
    prompts = [format_prompt(r.problem, data_cfg) for r in rows]
    lengths = _prompt_lengths(generator.tokenizer, prompts, data_cfg.system_prompt)
    batches, over = plan_batches(lengths, budget, cfg.batch_size // cfg.num_samples)
    _warn_over_budget(budget, over, rows, lengths)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_token, kv_peak, by_problem = kv_bytes_per_token(generator.model), 0, {}
    label = f"{generator.method} C={budget_label(budget)}"
    bar = tqdm(total=sum(map(len, batches)), desc=label, unit="problem", disable=not progress)
    for b, idx in enumerate(batches):
        recs, slots = _generate_batch(generator, [rows[i] for i in idx], [prompts[i] for i in idx], cache, cfg,
                                      data_cfg, batch_seed(seed, budget, b))
        kv_peak = max(kv_peak, slots * len(recs) * per_token)
        for j, i in enumerate(idx):
            by_problem[i] = recs[j * cfg.num_samples : (j + 1) * cfg.num_samples]
        bar.update(len(idx))
        bar.set_postfix(acc=f"{np.mean([r['correct'] for rs in by_problem.values() for r in rs]):.3f}")
    bar.close()
    records = [r for i in sorted(by_problem) for r in by_problem[i]]
    metrics = summarize(records, cfg.pass_k, cfg.bootstrap, cfg.ci, seed)
    rss = process_peak_rss_bytes()
    metrics.update(over_budget=len(over), over_budget_ids=[rows[i].id for i in over], ci_level=cfg.ci,
                   kv_cache_bytes_per_token=per_token, kv_cache_peak_bytes=kv_peak,
                   peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss,
                   process_peak_rss_bytes=rss, seconds=time.perf_counter() - start)
    msg = (f"evaluated {label}: {metrics['num_problems']} problems x {cfg.num_samples} samples in "
           f"{metrics['seconds']:.1f}s, accuracy {_pct(metrics['accuracy'])}%, over budget {len(over)}")
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr)
    return metrics, records


# ----------------------------------------------------------------------------------------------------------------------
# All methods x all budgets


def _check_adapters(methods: Sequence[str], adapters: dict[str, str | Path | None]) -> None:
    for method in methods:
        if method == "base":
            if adapters.get("base") is not None:
                raise ValueError(f"method 'base' is the model without an adapter; got adapter {adapters['base']!s}. "
                                 "Map 'base' to None (or leave it out).")
        elif adapters.get(method) is None:
            raise ValueError(f"evaluate.methods lists {method!r} but no adapter directory was given for it; pass "
                             f"adapters={{{method!r}: 'models/{method}/adapter', ...}} or drop it from "
                             "evaluate.methods.")


def _write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records))


def _summary(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    """Flat ``<method>/<budget>/<metric>`` entries plus each method's accuracy averaged over budgets (the paper's
    headline averages over cache settings) and over the bounded budgets only."""
    flat: dict[str, float | None] = {}
    for method, per_budget in results.items():
        for label, m in per_budget.items():
            for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "over_budget", "recall_accuracy"):
                flat[f"{method}/{label}/{key}"] = m.get(key)
        accs = {label: m["accuracy"] for label, m in per_budget.items() if m["accuracy"] is not None}
        flat[f"{method}/mean_accuracy"] = _mean(list(accs.values()))
        flat[f"{method}/mean_accuracy_bounded"] = _mean([a for label, a in accs.items() if label != "full"])
    return flat


def _evaluate_sources(gen: Generator, rows: list[Row], budget: int | None, cfg: EvalConfig, data_cfg: DataConfig,
                      seed: int, progress: bool, cache: CacheConfig | None) -> tuple[dict[str, Any], list[Record]]:
    """:func:`evaluate_policy` over all ``rows``, or, with ``evaluate.protocols``, over each source with its own
    protocol: then the metrics hold ``datasets`` ({source: metrics}) and ``accuracy`` is their mean (the paper's
    "Avg"; no interval across datasets), counts are summed and measured memory and time are the largest / total."""
    if not cfg.protocols:
        return evaluate_policy(gen, rows, budget, cfg, data_cfg, seed, progress=progress, cache=cache)
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.source, []).append(r)
    parts = {src: evaluate_policy(gen, grp, budget, cfg.for_source(src), data_cfg, seed, progress=progress,
                                  cache=cache)
             for src, grp in groups.items()}
    per = {src: m for src, (m, _) in parts.items()}
    measured = {"seconds": sum(m.pop("seconds") for m in per.values()),
                **{k: max(m.pop(k) for m in per.values()) for k in ("peak_memory_bytes", "process_peak_rss_bytes")}}
    metrics = {"accuracy": _mean([m["accuracy"] for m in per.values() if m["accuracy"] is not None]),
               "accuracy_ci_low": None, "accuracy_ci_high": None, "recall_accuracy": None, "ci_level": cfg.ci,
               "num_problems": sum(m["num_problems"] for m in per.values()),
               "over_budget": sum(m["over_budget"] for m in per.values()),
               "over_budget_ids": [i for m in per.values() for i in m.pop("over_budget_ids")],
               "kv_cache_peak_bytes": max(m["kv_cache_peak_bytes"] for m in per.values()),
               "kv_cache_bytes_per_token": next(iter(per.values()))["kv_cache_bytes_per_token"],
               "datasets": per, **measured}
    return metrics, [r for _, recs in parts.values() for r in recs]


def evaluate_all(base_model_dir: str | Path, adapters: dict[str, str | Path | None], rows: list[Row], cfg: EvalConfig,
                 data_cfg: DataConfig, out_dir: str | Path, seed: int, dtype: str = "float32",
                 device: str | None = None, progress: bool = True, cache: CacheConfig | None = None
                 ) -> dict[str, Any]:
    """Evaluate every method of ``cfg.methods`` under every budget of ``cfg.budgets`` and write the reports.

    Args:
        base_model_dir: the base model (HF directory, hub id or ``random:<preset>``), loaded once per method.
        adapters: method -> adapter directory (``base`` -> None); each adapter's recorded method must match.
        rows: evaluation problems. cfg: the ``evaluate`` section. data_cfg: prompt template, system prompt and
            answer oracle.
        out_dir: output folder. seed: the run seed (``base.seed``).
        dtype, device: model precision and device (default: CUDA when available).
        progress: progress bars and durations.
        cache: the ``cache`` section: the eviction rule and decode setting of every budget (see
            :func:`evaluate_policy`).

    Writes:
        ``metrics.json`` ({method: {budget_label: metrics}, "summary": flat}; numbers only, no wall time or measured
        memory: those go to ``resources.json``, so reruns give identical metrics), ``over_budget.json``
        ({budget_label: [problem ids]}), ``metrics.md`` (:func:`metrics_table`), ``samples/<method>_<budget>.jsonl``,
        and ``plots/`` (three PNGs, each with a JSON file of its points; see :func:`pte.pipeline.plots.write_plots`).

    Returns:
        The content of ``metrics.json``.
    """
    from pte.pipeline.plots import write_plots

    _check_adapters(cfg.methods, adapters)
    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    records: dict[tuple[str, str], list[Record]] = {}
    over_ids: dict[str, list[str]] = {}
    for method in cfg.methods:
        adapter = adapters.get(method)
        gen = Generator.load(str(base_model_dir), None if adapter is None else str(adapter), dtype=dtype,
                             device=device)
        if gen.method != method:
            raise ValueError(f"adapter {adapter!s} holds method {gen.method!r}, but it was given for {method!r}; "
                             "fix the method -> adapter mapping.")
        for budget in cfg.budgets:
            label = budget_label(budget)
            metrics, recs = _evaluate_sources(gen, rows, budget, cfg, data_cfg, seed, progress, cache)
            over_ids[label] = metrics.pop("over_budget_ids")
            results.setdefault(method, {})[label] = metrics
            records[(method, label)] = recs
            _write_jsonl(out / "samples" / f"{method}_{label}.jsonl", recs)
        del gen
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report: dict[str, Any] = {**results, "summary": _summary(results)}
    # Wall time and measured memory vary between machines and runs; they go to resources.json so that
    # metrics.json (what DVC compares) is identical across reruns and clones.
    resources = {m: {b: {k: v.pop(k) for k in _MEASURED if k in v} for b, v in per.items()}
                 for m, per in results.items()}
    write_json(out / "metrics.json", {**results, "summary": report["summary"]}, allow_nan=False)
    write_json(out / "resources.json", resources, allow_nan=False)
    write_json(out / "over_budget.json", over_ids, allow_nan=False)
    (out / "metrics.md").write_text(metrics_table(results) + "\n")
    write_plots(results, records, cfg, out / "plots")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Reports


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per budget, cells ``accuracy [CI low, high]`` in percent.

    Args:
        metrics: ``{method: {budget_label: metrics}}`` as returned by :func:`evaluate_all` (a ``summary`` key and
            other non-method entries are ignored).
    """
    methods = {m: v for m, v in metrics.items() if m != "summary" and isinstance(v, dict)
               and all(isinstance(x, dict) and "accuracy" in x for x in v.values())}
    labels = list(dict.fromkeys(label for v in methods.values() for label in v))
    heads = ["full cache" if label == "full" else f"C = {label}" for label in labels]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(labels)]
    ci_level = 0.95
    for method, per_budget in methods.items():
        cells = []
        for label in labels:
            m = per_budget.get(label)
            if m is None:
                cells.append("")
                continue
            ci_level = m.get("ci_level", ci_level)
            cell = f"{_pct(m['accuracy'])} [{_pct(m['accuracy_ci_low'])}, {_pct(m['accuracy_ci_high'])}]"
            if m.get("recall_accuracy") is not None:
                cell += f", recall {_pct(m['recall_accuracy'])}"
            if m.get("over_budget"):
                cell += f" ({m['over_budget']} over budget)"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Accuracy (%) = pass@1 averaged over the samples of each problem, [{100 * ci_level:g}% bootstrap "
                 "interval over problems]; C = total KV slots (prompt block + thinking window). Problems whose prompt "
                 "alone needs C slots or more are over budget: skipped, not counted as wrong. Recall (where shown) = "
                 "share of values recalled from early variables that the completions wrote correctly.")
    return "\n".join(lines)
