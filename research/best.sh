#!/bin/bash
# The best configuration of docs/evaluation.md ("Sixth study session", recipe M, seed 0) with the base, its LoRA_c
# twin and the Global-Only ablation: 128 held-out var_chain problems, greedy, C = 140 (and a full cache for the base
# and PTE). The cpu-demo preset (params.yaml) is recipe M, so no override is needed; the data and the warm-started
# base are the pipeline's: run `dvc repro warmstart` first (about 5 minutes). Every run goes to MLflow `pte-study`
# and appends one line to $OUT. Expected, from the runs that produced the published rows (one thread each, two
# jobs side by side): about 18 + 17 + 28 minutes of training plus a few minutes of evaluation per method.
set -eu
cd "$(dirname "$0")/.."
S="python -m research.study varchain --params params.yaml --data data --out ${OUT:-research/results/best.jsonl}"
$S --tag best-base --methods base --budgets 140 null
$S --tag best-M-pte_no_global --methods pte_no_global --budgets 140 null
$S --tag best-M-lora_c --methods lora_c
$S --tag best-M-pte_global_only --methods pte_global_only
