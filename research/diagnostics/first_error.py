"""Where greedy var_chain completions first go wrong (docs/evaluation.md, "Sixth study session").

For each held-out problem, compare the greedy completion line by line with the worked solution and count the index
of the first line that differs (``none`` when every line matches). On the d4 data (the recalled variable is always
``d`` and the recalling statement is line 7) this separates failures to recall an evicted value from errors made
earlier. Prints one JSON line per (adapter, budget) and appends it to ``--out``.

    PYTHONPATH=. python study/diagnostics/first_error.py --adapter none --budgets 140 null
"""

import argparse
import collections
import itertools
import json

import torch

from pte.config import load_params
from pte.evaluate import evaluate_policy
from pte.inference import Generator
from pte.study import greedy_eval_config, heldout_rows
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
budgets = tuple(None if x == "null" else int(x) for x in args.budgets)
ev = heldout_rows(p, args.data, 128)[1][: args.problems]  # the probe's held-out set (pte.study, --eval-size 128)
solutions = worked_solutions(ev, "first_error", "needs var_chain rows")
gen = Generator.load(args.base, None if args.adapter == "none" else args.adapter)
cfg = greedy_eval_config(p, budgets)
for b in budgets:
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
