"""Where greedy var_chain completions first go wrong (docs/evaluation.md, "Sixth study session").

For each held-out problem, compare the greedy completion line by line with the worked solution and count the index
of the first line that differs (``none`` when every line matches). On the d4 data (the recalled variable is always
``d`` and the recalling statement is line 7) this separates failures to recall an evicted value from errors made
earlier. Prints one JSON line per (adapter, budget) and appends it to ``--out``.

    PYTHONPATH=. python study/diagnostics/first_error.py --adapter none --budgets 140 null
"""

import argparse
import collections
import dataclasses
import itertools
import json

import torch

from pte.config import EvalConfig, load_params
from pte.data import normalize_problem, read_jsonl
from pte.evaluate import evaluate_policy
from pte.inference import Generator
from pte.sources import load_source
from pte.tasks import worked_solutions

ap = argparse.ArgumentParser()
ap.add_argument("--adapter", default="none", help="an adapter directory, or none for the base")
ap.add_argument("--params", default="runs/study/d4/params.yaml")
ap.add_argument("--data", default="runs/study/d4/data")
ap.add_argument("--base", default="models/warmstart")
ap.add_argument("--problems", type=int, default=64, help="the first N held-out problems of the varchain probe")
ap.add_argument("--budgets", nargs="+", default=["140", "null"])
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default=None)
args = ap.parse_args()
torch.set_num_threads(args.threads)

p = load_params(args.params)
seen = {normalize_problem(r.problem) for r in read_jsonl(f"{args.data}/train.jsonl")}
spec = dataclasses.replace(p.data.eval[0], size=128)  # the probe's held-out set (pte.study, --eval-size 128)
ev = [r for r in load_source(spec) if normalize_problem(r.problem) not in seen][: args.problems]
solutions = worked_solutions(ev, "first_error", "needs var_chain rows")
gen = Generator.load(args.base, None if args.adapter == "none" else args.adapter)
cfg = EvalConfig(methods=("base",), budgets=(140,), num_samples=1, pass_k=(1,), temperature=0.0,
                 max_new_tokens=p.grpo.max_completion_length, batch_size=64, bootstrap=100, allow_last_number=True)
for b in [None if x == "null" else int(x) for x in args.budgets]:
    metrics, records = evaluate_policy(gen, ev, b, cfg, p.data, p.base.seed, progress=False)
    first = collections.Counter()
    for rec, sol in zip(records, solutions, strict=True):
        pairs = itertools.zip_longest(rec["completion"].split("\n"), sol.split("\n"))  # a missing line differs
        first[next((str(i) for i, (g, t) in enumerate(pairs) if g != t), "none")] += 1
    row = {"adapter": args.adapter, "budget": b, "problems": len(ev), "accuracy": metrics["accuracy"],
           "recall_accuracy": metrics["recall_accuracy"], "first_wrong_line": dict(sorted(first.items()))}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
