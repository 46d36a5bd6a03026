"""Evaluation figures and their DVC plot data (paper Fig. 3, the memory columns of Table 1, Fig. 6).

* ``accuracy_vs_budget``: accuracy per method against the cache budget C, bootstrap-interval error bars; the full
  cache is drawn at the right as "full".
* ``kv_memory_vs_length``: KV-cache MiB per sequence against the generated length, bounded budgets vs the full cache.
  Analytic (slots x bytes per slot, see ``pte.pipeline.evaluate.kv_bytes_per_token``), built from the prompt block P and
  window W of the evaluated batches: a line for the cache held after t generated tokens (P + min(t, W), or P + t for
  the full cache) averaged over samples, and one dot per sample at its own final length. Not a process measurement:
  ``metrics.json`` holds the measured peaks.
* ``response_length_hist``: histogram of response lengths, one panel per method (columns) and budget (rows), correct
  and wrong samples stacked, the long-response count annotated (the paper's "Long: N (x%)").

Every PNG has a JSON file of its plotted points next to it (a list of flat objects, what ``dvc plots`` reads).
matplotlib runs with the Agg backend. This module knows nothing about models: it reads ``pte.pipeline.evaluate``'s
metrics and per-sample records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pte.config import EvalConfig

__all__ = ["accuracy_points", "budget_order", "kv_points", "length_hist_points", "write_plots"]

Records = dict[tuple[str, str], list[dict[str, Any]]]
MIB = float(1 << 20)


def budget_order(labels: list[str]) -> list[str]:
    """Numeric budgets ascending, then ``full`` (the x axis of the accuracy plot)."""
    nums = sorted((lab for lab in labels if lab != "full"), key=int)
    return nums + (["full"] if "full" in labels else [])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, points: list[dict[str, Any]], png: Path) -> list[Path]:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.clf()
    data = png.with_suffix(".json")
    data.write_text(json.dumps(points, indent=1, allow_nan=False) + "\n")
    return [png, data]


def accuracy_points(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One point per (method, budget): accuracy and its interval (None when no problem fitted the budget)."""
    return [{"method": method, "budget": label, "cache_slots": None if label == "full" else int(label),
             "accuracy": m["accuracy"], "ci_low": m["accuracy_ci_low"], "ci_high": m["accuracy_ci_high"],
             "over_budget": m["over_budget"], "num_problems": m["num_problems"]}
            for method, per_budget in results.items() for label, m in per_budget.items()]


def _plot_accuracy(results: dict[str, dict[str, dict[str, Any]]], png: Path) -> list[Path]:
    plt = _pyplot()
    points = accuracy_points(results)
    order = budget_order(list(dict.fromkeys(p["budget"] for p in points)))
    fig, ax = plt.subplots(figsize=(1.2 * len(order) + 3.5, 3.8))
    width = 0.25 / max(1, len(results))
    for j, method in enumerate(results):
        pts = [p for p in points if p["method"] == method and p["accuracy"] is not None]
        x = np.array([order.index(p["budget"]) for p in pts]) + (j - (len(results) - 1) / 2) * width
        y = np.array([100 * p["accuracy"] for p in pts])
        lo = np.array([100 * p["ci_low"] if p["ci_low"] is not None else np.nan for p in pts])
        hi = np.array([100 * p["ci_high"] if p["ci_high"] is not None else np.nan for p in pts])
        err = np.nan_to_num(np.stack([y - lo, hi - y]), nan=0.0) if pts else None
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        for xi, yi, q in zip(x, y, pts, strict=True):
            if q["over_budget"]:  # accuracy there is over fewer problems: say so on the point
                ax.annotate(f"{q['over_budget']} over budget", (xi, yi), textcoords="offset points", xytext=(4, -10),
                            fontsize=6)
    ax.set_xticks(range(len(order)), [lab if lab == "full" else f"C={lab}" for lab in order])
    ax.set_xlabel("KV-cache budget (prompt block + thinking window slots)")
    ax.set_ylabel("accuracy, pass@1 (%)")
    tops = [100 * (p["ci_high"] if p["ci_high"] is not None else p["accuracy"] or 0.0) for p in points]
    ax.set_ylim(0, min(102.0, max(10.0, 1.15 * max(tops, default=0.0))))
    ax.set_title("Accuracy vs cache budget (bootstrap CI over problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, points, png)
    plt.close(fig)
    return out


def kv_points(records: list[dict[str, Any]], label: str, bytes_per_token: int, max_new_tokens: int,
              num: int = 64) -> list[dict[str, Any]]:
    """Analytic KV MiB per sequence for one budget: a curve over generated length and one dot per sample.

    Args:
        records: per-sample records of one budget (``prompt_block``, ``window``, ``length``).
        label: the budget label. bytes_per_token: KV bytes of one slot. max_new_tokens: the x range.
    """
    if not records:
        return []
    p = np.array([r["prompt_block"] for r in records], dtype=np.float64)  # [N]
    w = np.array([np.inf if r["window"] is None else r["window"] for r in records], dtype=np.float64)
    grid = np.unique(np.linspace(0, max_new_tokens, num).round().astype(int))
    curve = [{"budget": label, "kind": "mean over samples", "generated_tokens": int(t),
              "kv_mib": float(np.mean(p + np.minimum(t, w)) * bytes_per_token / MIB)} for t in grid]
    dots = [{"budget": label, "kind": "sample", "generated_tokens": int(r["length"]),
             "kv_mib": float((r["prompt_block"] + min(r["length"], w[i])) * bytes_per_token / MIB)}
            for i, r in enumerate(records)]
    return curve + dots


def _plot_kv(records: Records, results: dict[str, dict[str, dict[str, Any]]], cfg: EvalConfig,
             png: Path) -> list[Path]:
    plt = _pyplot()
    method = next(iter(results))  # the cache layout depends on the prompts only, not on the method
    per_token = next(iter(results[method].values()))["kv_cache_bytes_per_token"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    points: list[dict[str, Any]] = []
    for k, label in enumerate(budget_order(list(results[method]))):
        pts = kv_points(records[(method, label)], label, per_token, cfg.max_new_tokens)
        points += pts
        color = f"C{k}"
        curve = [q for q in pts if q["kind"] != "sample"]
        dots = [q for q in pts if q["kind"] == "sample"]
        name = "full cache" if label == "full" else f"C={label}"
        ax.plot([q["generated_tokens"] for q in curve], [q["kv_mib"] for q in curve], color=color, label=name)
        ax.scatter([q["generated_tokens"] for q in dots], [q["kv_mib"] for q in dots], color=color, s=8, alpha=0.4)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache per sequence (MiB)")
    ax.set_title("KV memory vs generation length (analytic: slots x layers x 2 x kv_heads x head_dim x bytes)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, points, png)
    plt.close(fig)
    return out


def length_hist_points(records: list[dict[str, Any]], method: str, label: str, max_new_tokens: int,
                       threshold: int, bins: int = 20) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Histogram of response lengths (all and correct) and the long-response summary of one (method, budget)."""
    edges = np.linspace(0, max_new_tokens, bins + 1)
    lengths = np.array([r["length"] for r in records], dtype=np.float64)
    correct = np.array([bool(r["correct"]) for r in records], dtype=bool)
    all_counts, _ = np.histogram(lengths, edges)
    ok_counts, _ = np.histogram(lengths[correct], edges)
    hist = [{"method": method, "budget": label, "bin_low": float(edges[i]), "bin_high": float(edges[i + 1]),
             "count": int(all_counts[i]), "correct": int(ok_counts[i])} for i in range(bins)]
    long = lengths >= threshold
    summary = {"method": method, "budget": label, "threshold": threshold, "long": int(long.sum()),
               "long_share": float(long.mean()) if len(lengths) else None,
               "long_correct": int((long & correct).sum()), "samples": len(lengths)}
    return hist, summary


def _plot_lengths(records: Records, results: dict[str, dict[str, dict[str, Any]]], cfg: EvalConfig,
                  png: Path) -> list[Path]:
    plt = _pyplot()
    methods = list(results)
    labels = budget_order(list(dict.fromkeys(lab for v in results.values() for lab in v)))
    fig, axes = plt.subplots(len(labels), len(methods), figsize=(3.2 * len(methods), 2.4 * len(labels)),
                             squeeze=False, sharex=True)
    points: list[dict[str, Any]] = []
    for r, label in enumerate(labels):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            hist, s = length_hist_points(records.get((method, label), []), method, label, cfg.max_new_tokens,
                                         cfg.long_threshold())
            points += hist + [{**s, "kind": "long_summary"}]
            lows = [h["bin_low"] for h in hist]
            widths = [h["bin_high"] - h["bin_low"] for h in hist]
            ok = [h["correct"] for h in hist]
            ax.bar(lows, ok, widths, align="edge", color="C2", label="correct")
            ax.bar(lows, [h["count"] - h["correct"] for h in hist], widths, bottom=ok, align="edge", color="C7",
                   label="wrong")
            ax.set_ylim(0, 1.45 * max([1] + [h["count"] for h in hist]))  # headroom for the annotation
            share = "n/a" if s["long_share"] is None else f"{100 * s['long_share']:.1f}%"
            ax.text(0.97, 0.95, f"Long (>={s['threshold']}): {s['long']} ({share})\ncorrect: {s['long_correct']}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.set_title(f"{method}, {'full cache' if label == 'full' else 'C=' + label}", fontsize=8)
            if r == len(labels) - 1:
                ax.set_xlabel("response length (tokens)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    out = _save(fig, points, png)
    plt.close(fig)
    return out


def write_plots(results: dict[str, dict[str, dict[str, Any]]], records: Records, cfg: EvalConfig,
                out_dir: str | Path) -> list[Path]:
    """Write the three figures and their point files into ``out_dir``.

    Args:
        results: ``{method: {budget_label: metrics}}`` (metrics need ``kv_cache_bytes_per_token``).
        records: ``{(method, budget_label): per-sample records}``.
        cfg: the ``evaluate`` section (max_new_tokens, long-response threshold).

    Returns:
        The paths written: ``accuracy_vs_budget``, ``kv_memory_vs_length``, ``response_length_hist``, each ``.png`` +
        ``.json``.
    """
    out = Path(out_dir)
    return (_plot_accuracy(results, out / "accuracy_vs_budget.png")
            + _plot_kv(records, results, cfg, out / "kv_memory_vs_length.png")
            + _plot_lengths(records, results, cfg, out / "response_length_hist.png"))
