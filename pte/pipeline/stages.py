"""Pipeline stage entry points: what ``dvc.yaml`` and the Prefect flows run, as ``pte <stage> --params ...``.

Each stage reads ``params.yaml``, calls one function of the package and writes its outputs and a
``metrics.json`` (for DVC). They only wire: the logic lives in the modules they call.

What a stage declares to DVC is deterministic (the same bytes on every run, so ``dvc.lock`` and the committed
metrics do not change); what varies from run to run (wall time, memory, MLflow run ids and versions, the training
log and checkpoints) goes to side files that DVC does not track and git ignores (docs/pipeline.md, "What is committed").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from pte.config import Params, load_params
from pte.config.methods import PTE_METHODS
from pte.data.rows import write_json
from pte.pipeline.numerics import environment, pin
from pte.training.warmstart import resolve_base

__all__ = ["REGISTRATION_RUN_KEYS", "add_stage_parsers", "registered_candidate", "stage_base_model", "stage_data",
           "stage_evaluate", "stage_register", "stage_train", "stage_warmstart"]

REGISTRATION_RUN_KEYS = ("version", "alias", "previous_champion", "run_id", "model_uri")
"""Keys of :func:`pte.pipeline.registry.register`'s answer that depend on what the registry already holds (or are new
ids on every call): they stay in the side file ``registration.json``, out of the register stage's declared output."""


def with_base(params: Params, base: str | None) -> Params:
    """``params`` with ``model.source`` replaced by the base-model stage's output directory."""
    if base is None:
        return params
    return dataclasses.replace(params, model=dataclasses.replace(params.model, source=str(base)))


def stage_base_model(params: Params, out: Path) -> dict[str, Any]:
    """Load ``model.source`` (hub id, GGUF, package file) once and write it as a plain HF directory."""
    from pte.engine.models import load_model, save_hf

    # on the CPU, where this stage runs, model.dtype auto is float32 (pte.engine.models.resolve_dtype)
    model, tok = load_model(params.model.source, dtype=params.model.dtype, revision=params.model.revision,
                            seed=params.base.seed)
    save_hf(model, tok, out)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "model_type": model.config.model_type, "layers": model.config.num_hidden_layers}


def stage_data(params: Params, out: Path) -> dict[str, Any]:
    """Build the train / eval JSONL splits (offline generators, CHAMP, or hub datasets)."""
    from pte.data.rows import prepare_data

    return prepare_data(params.data, out)


def stage_warmstart(params: Params, base: str | None, data: Path, out: Path, reports: Path) -> dict[str, Any]:
    """Fine-tune the base on worked solutions of ``data`` (``data/warmstart.jsonl``) into ``out`` when
    ``warmstart.enabled``; otherwise write only the marker that tells later stages to use the base as it is."""
    from pte.data.rows import read_jsonl
    from pte.training.warmstart import warmstart, write_disabled

    if not params.warmstart.enabled:
        write_disabled(out)
        return {"enabled": False}
    result = warmstart(base or params.model.source, read_jsonl(data), params.warmstart, params.data, out,
                       seed=params.base.seed)
    # DVC compares metrics.json across runs: deterministic numbers only; the loss curve goes beside it (a plot), and
    # the wall time to resources.json, a side file that DVC does not track (docs/pipeline.md, "What is committed")
    write_json(reports / "resources.json", {"seconds": result.pop("seconds")})
    write_json(reports / "loss.json", {"loss": result.pop("history")})
    return {"enabled": True, **result}


def _training_rows(params: Params, data: Path) -> tuple[list, list[str], list[str] | None]:
    """The training rows of ``data``, their prompts, and (teacher-forced objectives) their worked solutions."""
    from pte.data.rows import format_prompt, read_jsonl

    rows = read_jsonl(data)
    prompts = [format_prompt(r.problem, params.data) for r in rows]
    solutions = None
    if params.train.teacher_forced():
        from pte.data.tasks import worked_solutions

        solutions = worked_solutions(rows, f"train.objective = {params.train.objective!r} on worked solutions",
                                     "train on sources with a solution writer "
                                     "(var_chain, reasoning_gym:chain_sum) or use train.objective grpo or distill.")
    return rows, prompts, solutions


def stage_sensitivity(params: Params, base: str | None, data: Path, out: Path) -> dict[str, Any]:
    """The frozen base's eviction sensitivity of every weighted ``sft`` step, once for every method
    (``out/`` :data:`~pte.training.sensitivity.SENSITIVITY_FILE`; :mod:`pte.training.sensitivity`)."""
    from pte.training.sensitivity import SENSITIVITY_FILE, compute_sensitivities

    params = with_base(params, base)
    rows, prompts, solutions = _training_rows(params, data)
    return compute_sensitivities(params, prompts, [r.problem for r in rows], solutions or [],
                                 out / SENSITIVITY_FILE)


def stage_train(params: Params, method: str, base: str | None, data: Path, out: Path, resume: bool = True,
                progress: bool = True, sensitivity: Path | None = None) -> dict[str, Any]:
    """Train ``method`` with ``train.objective`` (``grpo``, ``sft`` or ``distill``) on the rows of ``data``; writes
    ``out/{adapter,checkpoints,metrics.jsonl}``.

    ``adapter`` is the declared output; ``checkpoints`` and ``metrics.jsonl`` (the run's log, timings included) are
    side files that DVC neither tracks nor deletes, so a rerun after a kill resumes from them. ``sensitivity``: the
    sensitivity stage's output directory (its weighted steps are read, not recomputed)."""
    from pte.pipeline.tracking import environment_tags, make_tracker, read_metrics
    from pte.training.runtime import shutdown_distributed
    from pte.training.sensitivity import SENSITIVITY_FILE
    from pte.training.train import train

    params = with_base(params, base)
    rows, prompts, solutions = _training_rows(params, data)
    # the trainer writes out/metrics.jsonl itself; the tracker adds MLflow when configured and reachable
    tracker = make_tracker(params.tracking, run_name=f"train-{method}",
                           tags={"method": method, "stage": "train", **environment_tags()})
    try:
        train(params, method, prompts, [r.answer for r in rows], out, tracker=tracker, resume=resume,
              progress=progress, problems=[r.problem for r in rows], solutions=solutions,
              sensitivity=None if sensitivity is None else sensitivity / SENSITIVITY_FILE)
        shutdown_distributed()  # not after a failure: a rank stopped by an error must not wait for the others
    finally:
        tracker.close()
    history = read_metrics(out / "metrics.jsonl")
    summary: dict[str, Any] = {"method": method, "steps": len(history)}
    if method in PTE_METHODS:  # which PTE this is: the paper's form or named extensions
        summary["form"] = params.pte.form()
    if history:
        k = max(1, len(history) // 4)
        # deterministic numbers only (DVC compares this file across runs); memory and timing stay in metrics.jsonl
        for key in ("reward", "loss", "recall/accuracy", "recall/token_accuracy"):
            if all(key in r for r in history):
                name = key.replace("/", "_")
                summary.update({f"{name}_first": sum(r[key] for r in history[:k]) / k,
                                f"{name}_last": sum(r[key] for r in history[-k:]) / k})
    return summary


def stage_evaluate(params: Params, base: str | None, models: Path, data: Path, out: Path) -> dict[str, Any]:
    """Every method of ``evaluate.methods`` under every budget of ``evaluate.budgets``; reports under ``out``."""
    from pte.data.rows import read_jsonl
    from pte.pipeline.evaluate import evaluate_all

    adapters = {m: None if m == "base" else models / m / "adapter" for m in params.evaluate.methods}
    metrics = evaluate_all(base or params.model.source, adapters, read_jsonl(data), params.evaluate, params.data,
                           out, params.base.seed, dtype=params.model.dtype, cache=params.cache)
    return metrics["summary"]


def stage_register(params: Params, base: str | None, adapter: Path, metrics: Path) -> dict[str, Any]:
    """Register the trained policy in MLflow; ``champion`` only when it beats the current one."""
    from pte.pipeline.registry import register

    ev = params.evaluate
    budget = params.registry.budget_key()
    cache = params.cache.for_budget(None) if budget == "full" else params.cache
    if budget not in ("full", "min"):
        cache = params.cache.for_budget(int(budget))
    elif budget == "min" and any(b is not None for b in ev.budgets):
        cache = params.cache.for_budget(min(b for b in ev.budgets if b is not None))
    return register(adapter, base or params.model.source, metrics, params.registry, params.tracking, cache=cache,
                    sampling=ev.sampling(), dtype=params.model.dtype, base_source=params.model.source,
                    seed=params.base.seed, data=params.data)


def registered_candidate(registration: dict[str, Any], metric_name: str) -> dict[str, Any]:
    """What was submitted to the registry (model name, compared metric, its value and budget), without the registry's
    answer (:data:`REGISTRATION_RUN_KEYS`): the register stage's deterministic declared output."""
    return {"metric_name": metric_name, **{k: v for k, v in registration.items() if k not in REGISTRATION_RUN_KEYS}}


def _cmd(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.command != "data":  # the data stage runs no kernel; every other stage pins before torch loads
        pin(params.numerics)
    out = Path(args.out)
    # train, evaluate and register start from the warm-started model when its stage produced one
    base = resolve_base(getattr(args, "base", None), getattr(args, "warmstart", None))
    reports = out  # where the stage's metrics go, and its numeric environment beside them
    if args.command == "base-model":
        summary = stage_base_model(params, out)
        metrics = Path(args.metrics or out.parent / "base_model_metrics.json")
        write_json(metrics, summary)
        reports = metrics.parent
    elif args.command == "data":
        summary = stage_data(params, out)
        write_json(out / "stats.json", summary)
    elif args.command == "warmstart":
        reports = Path(args.reports)
        summary = stage_warmstart(params, base, Path(args.data), out, reports)
        write_json(reports / "metrics.json", summary)
    elif args.command == "sensitivity":
        summary = stage_sensitivity(params, base, Path(args.data), out)
        write_json(out / "metrics.json", summary)
    elif args.command == "train":
        summary = stage_train(params, args.method, base, Path(args.data), out, resume=not args.no_resume,
                              sensitivity=Path(args.sensitivity) if args.sensitivity else None)
        write_json(out / "metrics.json", summary)
    elif args.command == "evaluate":
        summary = stage_evaluate(params, base, Path(args.models), Path(args.data), out)
    elif args.command == "register":
        summary = stage_register(params, base, Path(args.adapter), Path(args.metrics))
        write_json(out / "registration.json", summary)  # side file: version, alias, run id (flows/pipeline.py)
        write_json(out / "candidate.json", registered_candidate(summary, params.registry.metric))
    if args.command != "data":
        # provenance beside the stage's metrics: committed with them, not declared to DVC (docs/reproducibility.md)
        write_json(reports / "environment.json", environment())
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def add_stage_parsers(sub) -> None:
    """Register the stage commands on the ``pte`` command."""
    p = sub.add_parser("base-model", help="convert model.source into a plain HF directory (models/base)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="models/base")
    p.add_argument("--metrics", help="where to write the stage summary JSON")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("data", help="build data/{train,eval,warmstart}.jsonl")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="data")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("warmstart", help="supervised fine-tuning of the base on worked solutions (models/warmstart)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--base", help="base model directory (default: model.source from params)")
    p.add_argument("--data", default="data/warmstart.jsonl")
    p.add_argument("--out", default="models/warmstart")
    p.add_argument("--reports", default="reports/warmstart", help="where metrics.json, loss.json, resources.json go")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("sensitivity", help="the frozen base's eviction sensitivity of the weighted sft steps, once "
                       "for every method (models/sensitivity)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--base", help="base model directory (default: model.source from params)")
    p.add_argument("--warmstart", help="warm-start stage output; used as the base when it holds a model")
    p.add_argument("--data", default="data/train.jsonl")
    p.add_argument("--out", default="models/sensitivity")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("train", help="training of one method (grpo, sft or distill) under its cache")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--method", required=True, help="lora, lora_c, pte, pte_global_only or pte_no_global")
    p.add_argument("--base", help="base model directory (default: model.source from params)")
    p.add_argument("--warmstart", help="warm-start stage output; used as the base when it holds a model")
    p.add_argument("--data", default="data/train.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true", help="fail instead of resuming existing checkpoints")
    p.add_argument("--sensitivity", help="the sensitivity stage's output folder: its eviction sensitivities are read "
                   "instead of computed")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("evaluate", help="accuracy of every method under every cache budget, with plots")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--base", help="base model directory (default: model.source from params)")
    p.add_argument("--warmstart", help="warm-start stage output; used as the base when it holds a model")
    p.add_argument("--models", default="models", help="folder holding <method>/adapter for each trained method")
    p.add_argument("--data", default="data/eval.jsonl")
    p.add_argument("--out", default="reports/evaluate")
    p.set_defaults(func=_cmd)

    p = sub.add_parser("register", help="register the trained policy in MLflow (champion / challenger)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--base", help="base model directory (default: model.source from params)")
    p.add_argument("--warmstart", help="warm-start stage output; used as the base when it holds a model")
    p.add_argument("--adapter", default="models/pte/adapter")
    p.add_argument("--metrics", default="reports/evaluate/metrics.json")
    p.add_argument("--out", default="reports/register", help="where candidate.json and registration.json go")
    p.set_defaults(func=_cmd)
