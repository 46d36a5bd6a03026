#!/bin/bash
# The mechanism grid of docs/evaluation.md ("What makes the state learn"), one thread, every run in MLflow pte-study.
set -u
S="python -m pte.study mechanism --threads 1 --out ${OUT:-runs/study/mechanism.jsonl}"
$S --tag plain --methods pte lora_c lora pte_global_only pte_no_global --set steps=100
$S --tag plain-32fillers --methods pte --set steps=300 --set fillers=32
$S --tag pairs2 --methods lora lora_c pte pte_no_global pte_global_only --set steps=300 --set pairs=2 --set fillers=6
$S --tag pairs2-r32g32 --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set rank=32 --set global_tokens=32
$S --tag pairs2-lr1e-2 --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set lr=0.01
$S --tag pairs2-recursive --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set pte.normalize=recursive
$S --tag pairs4 --methods lora pte pte_no_global --set steps=300 --set pairs=4 --set fillers=6
