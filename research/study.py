"""Study runs on what makes the thought state learn (docs/evaluation.md, "What makes the state learn").

Two instruments, every run recorded in the MLflow experiment ``pte-study`` (and a JSON line in ``--out``):

* ``mechanism``: :func:`research.mechanism.run_mechanism` over a grid of settings (seconds per run);
* ``varchain``: the recall probe on the real demo model: train a method with ``train.objective`` (``sft`` by
  default) from the warm-started base, then measure on held-out problems (a) teacher-forced recall under the
  training cache (NLL and accuracy on the tokens that write a recalled value) and (b) greedy answer and recall
  accuracy when generating under the bounded budget.

    python -m research.study mechanism --out runs/study/mechanism.jsonl --set fillers=32 --set lr=0.01
    python -m research.study varchain --params params.yaml --base models/warmstart --methods pte lora_c \
        --set train.steps=60 --set adapter.rank=16

``--set`` overrides one setting (``key=value``, YAML values); repeat it. Grids are shell loops over ``--set``.
This module wires the engine, the trainer and the tracker; it holds no method logic of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["adapter_parser", "greedy_eval_config", "heldout_rows", "main", "rows_inputs", "rows_recall",
           "teacher_forced_recall", "varchain_probe"]


def _tracker(experiment: str, name: str, tags: dict[str, str]):
    from pte.config import TrackingConfig
    from pte.pipeline.tracking import make_tracker

    return make_tracker(TrackingConfig(experiment=experiment), run_name=name, tags=tags)


def _record(out: Path, row: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
    print(json.dumps(row, sort_keys=True), flush=True)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is invalid; write key=value, e.g. --set train.steps=60")
        out[key] = yaml.safe_load(value)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# var_chain recall probe


@torch.no_grad()
def teacher_forced_recall(model, tok, problems: list[str], prompts: list[str], solutions: list[str], cache_cfg,
                          system: str | None, batch_size: int = 16) -> dict[str, float]:
    """Recall NLL / accuracy and solution NLL of worked solutions replayed under ``cache_cfg`` (no training).

    The tokens that write a recalled value are the ones an evicted thought must supply (:func:`recall_positions`).
    """
    from pte.engine.cache import plan_cache
    from pte.engine.inference import eos_ids
    from pte.engine.replay import replay_logprobs
    from pte.training.objectives import sft_batch, sft_chunk

    sums = torch.zeros(4, dtype=torch.float64)  # nll, recall nll, recall hits, recalls (as sft counts them)
    tokens_total = 0.0
    eos = eos_ids(model, tok)[0]
    for a in range(0, len(prompts), batch_size):
        batch = sft_batch(tok, prompts[a : a + batch_size], problems[a : a + batch_size],
                          solutions[a : a + batch_size], system, eos)
        tokens_total += float(batch.mask.sum())

        def on_segment(cols, lp, logits, batch=batch):
            sums.add_(sft_chunk(lp, logits, batch.tokens[:, cols], batch.mask[:, cols], batch.recall[:, cols], 1.0)[1])

        replay_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask,
                        plan_cache(cache_cfg, batch.prompt_ids.shape[1]), 1.0, on_segment=on_segment,
                        with_logits=True)
    nll, r_nll, r_hits, r_n = sums.tolist()
    return {"tf/nll": nll / tokens_total, "tf/recall_nll": r_nll / max(r_n, 1),
            "tf/recall_accuracy": r_hits / max(r_n, 1)}


_NEEDS = "the probe needs var_chain (or reasoning_gym:chain_sum) rows in data.train and data.eval."


def rows_inputs(rows: list, params) -> tuple[list[str], list[str], list[str]]:
    """``(problems, prompts, worked solutions)`` of ``rows``, prompted as ``params.data`` says."""
    from pte.data.rows import format_prompt
    from pte.data.tasks import worked_solutions

    return ([r.problem for r in rows], [format_prompt(r.problem, params.data) for r in rows],
            worked_solutions(rows, "varchain probe", _NEEDS))


def rows_recall(gen, rows: list, params) -> dict[str, float]:
    """:func:`teacher_forced_recall` of ``gen`` (a loaded :class:`~pte.engine.inference.Generator`) on ``rows``'
    worked solutions, prompted and cached as ``params`` say."""
    return teacher_forced_recall(gen.model, gen.tokenizer, *rows_inputs(rows, params), params.cache,
                                 params.data.system_prompt)


def adapter_parser(prog: str, doc: str, eval_size: int) -> argparse.ArgumentParser:
    """The command line of a script that measures trained adapters on held-out rows (:func:`heldout_rows`)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/warmstart")
    parser.add_argument("--data", default="data")
    parser.add_argument("--adapters", nargs="+", required=True, help="adapter directories")
    parser.add_argument("--eval-size", type=int, default=eval_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON-lines results file (appended)")
    return parser


def heldout_rows(params, data_dir: str | Path, size: int) -> tuple[list, list]:
    """``(train rows, held-out rows)``: ``data_dir/train.jsonl``, and data.eval's first source regenerated at ``size``
    minus any problem of the train rows (the probe's held-out set)."""
    from pte.data.rows import normalize_problem, read_jsonl
    from pte.data.sources import load_source

    rows = read_jsonl(Path(data_dir) / "train.jsonl")
    seen = {normalize_problem(r.problem) for r in rows}
    spec = dataclasses.replace(params.data.eval[0], count=size)
    return rows, [r for r in load_source(spec) if normalize_problem(r.problem) not in seen]


def greedy_eval_config(params, budgets: tuple[int | None, ...]):
    """The probe's evaluation: one greedy completion per problem, ``evaluate.max_new_tokens`` tokens."""
    from pte.config import EvalConfig

    return EvalConfig(methods=("base",), budgets=budgets, num_samples=1, pass_k=(1,), temperature=0.0,
                      max_new_tokens=params.evaluate.max_new_tokens, batch_size=64, bootstrap=1000)


def varchain_probe(params, method: str, base: str, rows: list, ev: list, out_dir: Path,
                   budgets: tuple[int | None, ...] = (140,), trained: Path | None = None) -> dict[str, float]:
    """Train ``method`` from ``base`` with ``params`` on ``rows`` and measure recall on the held-out rows ``ev``:
    teacher-forced under the training cache, and greedy generation under each of ``budgets`` (may be empty).
    ``trained``: measure the adapter ``trained/<method>/adapter`` (e.g. a pipeline run's ``models``) instead of
    training one."""
    from pte.data.rows import format_prompt
    from pte.data.tasks import worked_solutions
    from pte.engine.inference import Generator
    from pte.pipeline.evaluate import budget_label, evaluate_policy
    from pte.pipeline.stages import with_base
    from pte.training.train import train

    params = with_base(params, base)
    t0 = time.perf_counter()
    adapter = out_dir / "adapter" if trained is None else Path(trained) / method / "adapter"
    if method != "base" and trained is None:
        train(params, method, [format_prompt(r.problem, params.data) for r in rows], [r.answer for r in rows],
              out_dir, resume=False, progress=True, problems=[r.problem for r in rows],
              solutions=worked_solutions(rows, "varchain probe", _NEEDS))
    seconds = time.perf_counter() - t0
    gen = Generator.load(base, None if method == "base" else str(adapter))
    tf = rows_recall(gen, ev, params)
    out = {**tf, "train_seconds": seconds, "eval_problems": len(ev)}
    if not budgets:
        return out
    cfg = greedy_eval_config(params, budgets)
    for budget in budgets:
        m, _ = evaluate_policy(gen, ev, budget, cfg, params.data, params.base.seed, progress=False, cache=params.cache)
        label = budget_label(budget)
        out.update({f"gen/{label}/accuracy": m["accuracy"], f"gen/{label}/accuracy_ci_low": m["accuracy_ci_low"],
                    f"gen/{label}/accuracy_ci_high": m["accuracy_ci_high"],
                    f"gen/{label}/recall_accuracy": m["recall_accuracy"]})
    return out


def _override(params, sets: dict[str, Any]):
    from pte.config import params_from_dict

    data = params.to_dict()
    for key, value in sets.items():
        if "." not in key or key.split(".")[0] not in data:
            raise ValueError(f"--set {key}: expected <section>.<key> of params.yaml, e.g. train.steps or "
                             "train.sft.eviction_weight")
        _put(data, key, value)
    return params_from_dict(data)


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in the nested mapping ``data``, creating the sections on the way (nested sections such
    as train.sft may be absent from a dump)."""
    *path, name = key.split(".")
    for part in path:
        data = data.setdefault(part, {})
    data[name] = value


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    mech = sub.add_parser("mechanism", help="the synthetic recall test over settings")
    mech.add_argument("--methods", nargs="+", default=["pte", "lora_c", "lora"])
    var = sub.add_parser("varchain", help="the var_chain recall probe on the warm-started demo model")
    var.add_argument("--params", default="params.yaml")
    var.add_argument("--base", default="models/warmstart")
    var.add_argument("--data", default="data")
    var.add_argument("--methods", nargs="+", default=["pte", "lora_c"])
    var.add_argument("--eval-size", type=int, default=128,
                     help="held-out problems: data.eval's first source regenerated at this size, minus train problems")
    var.add_argument("--budgets", nargs="*", default=["140"], help="generation budgets (null = full); none = skip")
    var.add_argument("--runs", default="runs/study")
    var.add_argument("--trained", default=None,
                     help="measure the adapters <dir>/<method>/adapter of an earlier run (e.g. models) instead of "
                          "training them")
    for p in (mech, var):
        p.add_argument("--set", action="append", default=[], help="key=value override (repeatable)")
        p.add_argument("--out", default=None, help="JSON-lines results file (appended)")
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--tag", default="", help="a label for this run in MLflow and the results file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = _parse_sets(args.set)
    if args.study == "mechanism":
        from pte.config import PTEConfig, section_from_dict
        from research.mechanism import MechanismConfig, run_mechanism

        pte_sets: dict[str, Any] = {}  # pte.<key> and pte.extensions.<key>, as the params file nests them
        for key, value in sets.items():
            if key.startswith("pte."):
                _put(pte_sets, key[4:], value)
        cfg = MechanismConfig(**{k: v for k, v in sets.items() if not k.startswith("pte.")},
                              pte=section_from_dict(PTEConfig, pte_sets, "pte") if pte_sets else None)
        out = Path(args.out or "runs/study/mechanism.jsonl")
        for method in args.methods:
            tracker = _tracker("pte-study", f"mechanism-{method}", {"study": "mechanism", "method": method,
                                                                     "tag": args.tag})
            res = run_mechanism(cfg, method, progress=True)
            row = {"study": "mechanism", "tag": args.tag, "method": method, "settings": sets,
                   **dataclasses.asdict(res)}
            tracker.log_params({"method": method, **{k: str(v) for k, v in sets.items()}})
            tracker.log_metrics({"accuracy": res.accuracy, "final_loss": res.final_loss, "seconds": res.seconds}, 0)
            for i, loss in enumerate(res.curve):  # one point per twelfth of the steps: where the plateau ends
                tracker.log_metrics({"loss_curve": loss}, i)
            tracker.close()
            _record(out, row)
        return 0
    from pte.config import load_params

    params = _override(load_params(args.params), sets)
    out = Path(args.out or "runs/study/varchain.jsonl")
    rows, ev = heldout_rows(params, args.data, args.eval_size)
    budgets = tuple(None if b == "null" else int(b) for b in args.budgets)
    for method in args.methods:
        name = f"varchain-{method}-{args.tag or int(time.time())}"
        tracker = _tracker("pte-study", name, {"study": "varchain", "method": method, "tag": args.tag})
        res = varchain_probe(params, method, args.base, rows, ev, Path(args.runs) / name, budgets, args.trained)
        tracker.log_params({"method": method, **{k: str(v) for k, v in sets.items()}})
        tracker.log_metrics({k: v for k, v in res.items() if v is not None}, 0)
        tracker.close()
        _record(out, {"study": "varchain", "tag": args.tag, "method": method, "settings": sets,
                      **({"trained": args.trained} if args.trained else {}), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
