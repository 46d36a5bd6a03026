#!/bin/bash
# The mechanism grid of docs/evaluation.md ("What makes the state learn"), one thread, every run in MLflow pte-study.
set -u
S="python -m research.study mechanism --threads 1 --out ${OUT:-runs/study/mechanism.jsonl}"
$S --tag plain --methods pte lora_c lora pte_global_only pte_no_global --set steps=100
$S --tag plain-32fillers --methods pte --set steps=300 --set fillers=32
$S --tag pairs2 --methods lora lora_c pte pte_no_global pte_global_only --set steps=300 --set pairs=2 --set fillers=6
$S --tag pairs2-r32g32 --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set rank=32 --set global_tokens=32
$S --tag pairs2-lr1e-2 --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set lr=0.01
$S --tag pairs2-recursive --methods pte --set steps=300 --set pairs=2 --set fillers=6 --set pte.normalize=recursive
$S --tag pairs4 --methods lora pte pte_no_global --set steps=300 --set pairs=4 --set fillers=6
# Distractors (2026-11-29, second study session): the fillers are random symbols, so every evicted token carries
# content; one keyed pair must be recalled among them.
$S --tag distract1 --methods lora pte lora_c pte_no_global --set steps=300 --set distractors=true --set fillers=6
for f in 16 32; do
  $S --tag distract1-f$f --methods lora pte pte_no_global --set steps=300 --set distractors=true --set fillers=$f
done
# The write gate (pte.write_gate, not the paper): a learned per-token gate on the event terms.
for f in 16 32; do
  $S --tag distract1-f$f-gate --methods pte pte_no_global --set steps=300 --set distractors=true --set fillers=$f \
     --set pte.write_gate=true
done
$S --tag distract1-f32-gate-h64 --methods pte_no_global pte --set steps=300 --set distractors=true --set fillers=32 \
   --set pte.write_gate=true --set pte.gate_horizon=64
# The same instrument on the real demo model (SmolLM2-135M warm-started; needs `dvc repro warmstart`).
$S --tag smol-plain --methods pte --set steps=20 --set model=models/warmstart
$S --tag smol-pairs4 --methods pte --set steps=60 --set pairs=4 --set fillers=6 --set batch_size=16 \
   --set eval_rows=128 --set model=models/warmstart
# Associative recall with the gate: 4 pairs (fixed fillers; 16 distractors), capacity (rank/G 32) and steps.
$S --tag pairs4-gate --methods pte_no_global --set steps=300 --set pairs=4 --set fillers=6 --set pte.write_gate=true
$S --tag pairs4-d16-gate --methods pte_no_global lora --set steps=300 --set pairs=4 --set fillers=16 \
   --set distractors=true --set pte.write_gate=true --set pte.gate_horizon=64
$S --tag pairs4-gate-r32g32 --methods pte_no_global --set steps=300 --set pairs=4 --set fillers=6 \
   --set pte.write_gate=true --set rank=32 --set global_tokens=32
$S --tag pairs4-gate-1000 --methods pte_no_global --set steps=1000 --set pairs=4 --set fillers=6 --set pte.write_gate=true
# The selective read (pte.read=softmax, not the paper).
$S --tag pairs4-gate-softmax --methods pte_no_global --set steps=300 --set pairs=4 --set fillers=6 \
   --set pte.write_gate=true --set pte.read=softmax
$S --tag pairs4-softmax --methods pte_no_global pte --set steps=300 --set pairs=4 --set fillers=6 --set pte.read=softmax
$S --tag smol-d16-gate --methods pte_no_global --set steps=60 --set distractors=true --set fillers=16 \
   --set batch_size=16 --set eval_rows=128 --set pte.write_gate=true --set pte.gate_horizon=32 --set model=models/warmstart
$S --tag smol-d16 --methods pte pte_no_global lora_c --set steps=60 --set distractors=true --set fillers=16 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
# Third session. The demo's window geometry (32 slots, 8 evicted per event) on the demo model.
$S --tag smol-d40-w32e8 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=40 --set window=32 \
   --set evict=8 --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
# The value identified by context k tokens back (key_gap), as a worked solution's value is by its line's variable.
$S --tag keygap3-d16 --methods pte_no_global lora --set steps=300 --set distractors=true --set fillers=16 --set key_gap=3
$S --tag keygap3-d16-gate --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 --set key_gap=3 \
   --set pte.write_gate=true --set pte.gate_horizon=64
$S --tag keygap1-d16 --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 --set key_gap=1
$S --tag smol-keygap3-d16 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=16 --set key_gap=3 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
# The context write (pte.write_context, not the paper): the evicted tokens mixed by a learned causal convolution.
for c in 4 5 8; do
  $S --tag keygap3-d16-context$c --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 \
     --set key_gap=3 --set pte.write_context=$c --set pte.gate_horizon=64
done
$S --tag pairs4-context2 --methods pte_no_global pte --set steps=300 --set pairs=4 --set fillers=6 \
   --set pte.write_context=2 --set pte.gate_horizon=64
for n in 60 200; do
  $S --tag smol-keygap3-d16-context5$( [ $n = 200 ] && echo -200 ) --methods pte_no_global --set steps=$n \
     --set distractors=true --set fillers=16 --set key_gap=3 --set batch_size=16 --set eval_rows=128 \
     --set model=models/warmstart --set pte.write_context=5 --set pte.gate_horizon=64
done
$S --tag smol-keygap3-d16 --methods lora --set steps=60 --set distractors=true --set fillers=16 --set key_gap=3 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
$S --tag smol-keygap1-d16 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=16 --set key_gap=1 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
$S --tag smol-keygap1-d16-context3 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=16 \
   --set key_gap=1 --set batch_size=16 --set eval_rows=128 --set model=models/warmstart --set pte.write_context=3 \
   --set pte.gate_horizon=64
# Fourth session. The stored pair mid-thought (lead: random symbols before the key), so that only its content, not its
# position among the first tokens of the thought, tells it apart.
$S --tag smol-d16-lead8 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=16 --set lead=8 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
$S --tag d16-lead8 --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 --set lead=8
$S --tag d16-lead8-gate --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 --set lead=8 \
   --set pte.write_gate=true
$S --tag d16-lead8-context2 --methods pte_no_global --set steps=300 --set distractors=true --set fillers=16 --set lead=8 \
   --set pte.write_context=2 --set pte.gate_horizon=64
for n in 60 150 300 600; do
  $S --tag d16-lead8-context2-b16-$n --methods pte_no_global --set steps=$n --set batch_size=16 --set distractors=true \
     --set fillers=16 --set lead=8 --set pte.write_context=2 --set pte.gate_horizon=64
done
for n in 150 300; do
  $S --tag d16-lead8-context2-b16-$n-lr1e-2 --methods pte_no_global --set steps=$n --set lr=0.01 --set batch_size=16 \
     --set distractors=true --set fillers=16 --set lead=8 --set pte.write_context=2 --set pte.gate_horizon=64
done
for n in 300 600; do
  $S --tag keygap3-d16-lead8-context5$( [ $n = 600 ] && echo -600 ) --methods pte_no_global --set steps=$n \
     --set distractors=true --set fillers=16 --set lead=8 --set key_gap=3 --set pte.write_context=5 --set pte.gate_horizon=64
done
$S --tag keygap9-d16-lead8-context11-600 --methods pte_no_global --set steps=600 --set distractors=true --set fillers=16 \
   --set lead=8 --set key_gap=9 --set pte.write_context=11 --set pte.gate_horizon=64
for p in 2 4; do
  $S --tag pairs$p-d16-lead8-context2 --methods pte_no_global --set steps=300 --set pairs=$p --set distractors=true \
     --set fillers=16 --set lead=8 --set pte.write_context=2 --set pte.gate_horizon=64
done
# How early is "early"? The pair after 2 random symbols, few or more distractors, with and without the context write.
for f in 2 6; do
  $S --tag smol-d$f-lead2-context2 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=$f --set lead=2 \
     --set pte.write_context=2 --set pte.gate_horizon=64 --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
done
$S --tag smol-d6-lead2 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=6 --set lead=2 \
   --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
$S --tag smol-d6-lead8-context2 --methods pte_no_global --set steps=60 --set distractors=true --set fillers=6 --set lead=8 \
   --set pte.write_context=2 --set pte.gate_horizon=64 --set batch_size=16 --set eval_rows=128 --set model=models/warmstart
# Fifth session: the softmax write (pte.write=softmax, not the paper), pair mid-thought (lead 8). Results in
# research/results/mechanism-5.jsonl; the one-off comparisons through study/diagnostics/softmax_write.py of 41b9881 (same math,
# monkeypatched, linear vs softmax in one harness) in research/results/diagnostics-5.jsonl.
SM="--set distractors=true --set lead=8 --set pte.write_context=2 --set pte.gate_horizon=64 --set pte.write=softmax"
$S --tag tiny-lead8-c2-softmax --methods pte_no_global --set steps=300 --set batch_size=16 --set fillers=16 \
   --set eval_rows=128 $SM
for p in 2 4; do
  $S --tag tiny-lead8-c2-softmax-pairs$p --methods pte_no_global --set steps=300 --set fillers=16 --set pairs=$p \
     --set eval_rows=128 $SM
done
SMOL="--set model=models/warmstart --set batch_size=16 --set eval_rows=128 --set fillers=6"
$S --tag smol-d6-lead8-c2-softmax-600 --methods pte_no_global --set steps=600 $SMOL $SM
$S --tag smol-d6-lead8-c2-softmax-pte-300 --methods pte --set steps=300 $SMOL $SM
$S --tag smol-d6-lead8-c2-softmax-lr1e-3-300 --methods pte_no_global --set steps=300 --set lr=0.001 $SMOL $SM
$S --tag smol-d6-lead8-c2-linear-lr1e-3-100 --methods pte_no_global --set steps=100 --set lr=0.001 $SMOL \
   --set distractors=true --set lead=8 --set pte.write_context=2 --set pte.gate_horizon=64
