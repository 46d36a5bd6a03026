"""Measure |replay - rollout| per token at the demo's shapes, for genuine rollouts and for injected faults."""
from __future__ import annotations

import argparse, contextlib, json, os, sys, time
import torch

from pte.config import AdapterConfig, CacheConfig, PTEConfig, SamplingConfig
from pte.data.rows import DataConfig, format_prompt, read_jsonl
from pte.engine.models import load_model
from pte.engine.adapters import attach_adapter
from pte.engine.inference import encode_prompts, eos_ids
from pte.engine.rollout import generate
from pte.engine.replay import replay_logprobs
from pte.engine.cache import BoundedCache, CachePlan
from pte.engine.state import SegmentState


def perturb(model, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def fault(kind):
    if kind == "none":
        yield; return
    if kind == "position":
        orig = BoundedCache.positions_for
        def shifted(self, a, n):
            return orig(self, a, n) + 1
        BoundedCache.positions_for = shifted
        try: yield
        finally: BoundedCache.positions_for = orig
    elif kind == "state_skip_event":
        orig = SegmentState.observe
        calls = {"n": 0}
        def skip(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 1:
                return
            return orig(self, *a, **k)
        SegmentState.observe = skip
        try: yield
        finally: SegmentState.observe = orig
    elif kind == "state_rows_rolled":
        orig = SegmentState.observe
        def rolled(self, k, v, active=None):
            return orig(self, k.roll(1, 0), v.roll(1, 0), active=active)
        SegmentState.observe = rolled
        try: yield
        finally: SegmentState.observe = orig
    else:
        yield


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/warmstart")
    ap.add_argument("--data", default="data/eval.jsonl")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    rows = read_jsonl(args.data)[: args.rows]
    prompts = [format_prompt(r.problem, DataConfig()) for r in rows]
    settings = [("lora_c", {}), ("pte", {}), ("pte", {"write": "softmax", "write_context": 2, "use_global_state": False}),
                ("pte", {"write_gate": True}), ("pte", {"read": "gated"}), ("pte_global_only", {}), ("pte_no_global", {})]
    faults = ["none", "evict_off_by_one", "position", "state_skip_event", "state_rows_rolled"]
    for method, pkw in settings:
        model, tok = load_model(args.model, dtype="float32")
        model = attach_adapter(model, method, AdapterConfig(rank=8, alpha=16.0, target_modules=("q_proj","k_proj","v_proj","o_proj")), PTEConfig(global_tokens=8, **pkw))
        perturb(model, args.std, 0)
        model.eval()
        ids, mask = encode_prompts(tok, prompts)
        eos = eos_ids(model, tok)
        cache = CacheConfig(window=32)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            out = generate(model, ids, mask, cache, SamplingConfig(max_new_tokens=args.tokens, temperature=1.0), eos,
                           tok.pad_token_id, generator=gen)
        for f in faults:
            if f != "none" and method == "lora_c" and f.startswith("state"):
                continue
            plan = out.plan
            if f == "evict_off_by_one":
                plan = CachePlan(plan.prompt_len, plan.window, plan.evict + 1)
            with torch.no_grad(), fault(f):
                lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, plan, 1.0)
            v = out.mask.bool()
            dl = (lp - out.logprobs).abs()[v]
            dp = (lp.exp() - out.logprobs.exp()).abs()[v]
            row = {"method": method, "pte": pkw, "fault": f, "tokens": int(v.sum()),
                   "max_abs_dlogp": float(dl.max()), "p99_dlogp": float(dl.quantile(0.99)),
                   "median_dlogp": float(dl.median()), "max_abs_dp": float(dp.max()), "p99_dp": float(dp.quantile(0.99)),
                   "frac_dp_gt_1e-3": float((dp > 1e-3).float().mean()),
                   "min_logp_at_max": float(out.logprobs[v][dl.argmax()])}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()
