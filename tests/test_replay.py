"""Replay: teacher-forced log-probs equal the rollout's; segment-wise backward equals the full-graph gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny

from pte.config import AdapterConfig, CacheConfig, PTEConfig, PTEExtensions, SamplingConfig
from pte.engine.adapters import attach_adapter
from pte.engine.replay import replay_logprobs, segment_bounds
from pte.engine.rollout import generate


def _policy(method, family="llama-tiny", ext=None, **pte_kw):
    """A tiny model with ``method``'s adapter (``ext``: the ``pte.extensions`` settings)."""
    model, tok = tiny(family)
    model = attach_adapter(model, method, AdapterConfig(rank=8),
                           PTEConfig(global_tokens=4, extensions=PTEExtensions(**(ext or {})), **pte_kw))
    with torch.no_grad():  # non-zero adapters, so the state and LoRA really act
        for n, p in model.named_parameters():
            if n.endswith("pte_up") or "lora_B" in n:
                p.normal_(0, 0.2)
    return model, tok


def _rollout(model, tok, window=10, ratio=0.3, n=40, temperature=1.0):
    ids, am = batch(tok)
    out = generate(model, ids, am, CacheConfig(window=window, evict_ratio=ratio),
                   SamplingConfig(max_new_tokens=n, temperature=temperature), [tok.eos_token_id], tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    assert len(out.event_steps) >= 5 and bool((am == 0).any())
    return out


def test_segment_bounds_follow_the_event_schedule():
    from pte.engine.cache import CachePlan

    assert segment_bounds(CachePlan(5, 4, 1), 8) == [(0, 4), (4, 5), (5, 6), (6, 7)]
    assert segment_bounds(CachePlan(5, None, 0), 8) == [(0, 7)]
    assert segment_bounds(CachePlan(5, 10, 3), 1) == [(0, 0)]


@pytest.mark.parametrize("method", ["lora_c", "pte", "pte_no_global", "pte_global_only"])
@pytest.mark.parametrize("family", ["llama-tiny", "qwen3-tiny"])
def test_replay_equals_rollout_logprobs(method, family):
    model, tok = _policy(method, family)
    out = _rollout(model, tok, temperature=0.9)
    with torch.no_grad():
        lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9)
    m = out.mask.bool()
    torch.testing.assert_close(lp[m], out.logprobs[m], atol=1e-4, rtol=0)


def test_replay_recursive_normalize_equals_rollout():
    model, tok = _policy("pte", normalize="recursive")
    out = _rollout(model, tok)
    with torch.no_grad():
        lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan)
    torch.testing.assert_close(lp[out.mask.bool()], out.logprobs[out.mask.bool()], atol=1e-4, rtol=0)


def _random_context(model):
    with torch.no_grad():  # kernels far from the identity: every token's write mixes its predecessors
        enc = model.pte_adapter.encoder
        enc.context_k.normal_(0, 0.5)
        enc.context_v.normal_(0, 0.5)


@pytest.mark.parametrize("horizon", [2, 64])  # 2: older events are folded in detached; 64: all keep gradient
def test_replay_with_context_write_equals_rollout(horizon):
    model, tok = _policy("pte", ext={"write_context": 3, "grad_horizon": horizon})
    _random_context(model)
    out = _rollout(model, tok, temperature=0.9)
    with torch.no_grad():
        lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9)
        enc = model.pte_adapter.encoder
        for kernel in (enc.context_k, enc.context_v):  # back to the identity: each token written alone
            kernel.zero_()
            kernel[:, 0] = 1.0
        alone = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9)
    m = out.mask.bool()
    torch.testing.assert_close(lp[m], out.logprobs[m], atol=1e-4, rtol=0)
    assert (lp[m] - alone[m]).abs().max() > 1e-3  # the mixing acts


@pytest.mark.parametrize("horizon", [2, 64])  # 2: older events are pooled detached; 64: all keep gradient
@pytest.mark.parametrize("context", [1, 3])
def test_replay_with_softmax_write_equals_rollout(horizon, context):
    model, tok = _policy("pte", ext={"write": "softmax", "grad_horizon": horizon, "write_context": context})
    if context > 1:
        _random_context(model)
    out = _rollout(model, tok, temperature=0.9)
    with torch.no_grad():
        lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9)
        model.pte_adapter.pte_cfg = model.pte_adapter.encoder.cfg = PTEConfig(  # the same weights, a linear write
            global_tokens=4, extensions=PTEExtensions(grad_horizon=horizon, write_context=context))
        linear = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9)
    m = out.mask.bool()
    torch.testing.assert_close(lp[m], out.logprobs[m], atol=1e-4, rtol=0)
    assert (lp[m] - linear[m]).abs().max() > 1e-3  # the pooled write acts differently


def test_fresh_context_write_is_the_paper_form():
    """The kernels start at the identity (tap 0 = 1): a fresh adapter writes each token alone."""
    lps = []
    for c in (1, 4):
        torch.manual_seed(0)
        model, tok = _policy("pte", ext={"write_context": c})
        out = _rollout(model, tok, temperature=0.9)
        lps.append(out.logprobs[out.mask.bool()])
    torch.testing.assert_close(lps[0], lps[1], atol=1e-5, rtol=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method", ["pte", "lora_c", "pte+context", "pte+softmax"])
def test_segment_wise_backward_equals_full_graph(method):
    context = method == "pte+context"
    model, tok = _policy("pte" if "+" in method else method,
                         ext={"write_context": 3} if context else {"write": "softmax", "grad_horizon": 3}
                         if method == "pte+softmax" else {})
    if context:
        _random_context(model)
    out = _rollout(model, tok)
    weights = torch.randn(out.tokens.shape) * out.mask  # any per-token loss weights

    model.zero_grad(set_to_none=True)
    lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan)
    (lp * weights).sum().backward()
    full = _grads(model)

    model.zero_grad(set_to_none=True)
    replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan,
                    on_segment=lambda cols, seg: (seg * weights[:, cols]).sum().backward())
    seg = _grads(model)
    assert full.keys() == seg.keys() and len(full) > 0
    if method != "lora_c":
        assert any("pte_adapter.encoder" in n and full[n].abs().sum() > 0 for n in full)  # events reach the encoder
    if context:  # every tap of the kernels learns, the ones reaching into earlier tokens too
        taps = [full[f"pte_adapter.encoder.context_{x}"][:, j] for x in "kv" for j in range(3)]
        assert all(float(t.abs().sum()) > 0 for t in taps)
    for n in full:
        torch.testing.assert_close(seg[n], full[n], atol=1e-5, rtol=1e-4, msg=n)


def test_exact_full_graph_gradient_differs_only_by_the_cross_segment_terms():
    """Documented approximation: detaching earlier K/V drops cross-segment paths; the gradients stay aligned."""
    model, tok = _policy("pte")
    out = _rollout(model, tok)
    weights = torch.randn(out.tokens.shape) * out.mask
    grads = []
    for detach in (True, False):
        model.zero_grad(set_to_none=True)
        lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan,
                             detach_cache=detach)
        (lp * weights).sum().backward()
        grads.append(torch.cat([g.flatten() for g in _grads(model).values()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert not torch.allclose(grads[0], grads[1])  # the truncation is real ...
    assert cos > 0.5  # ... but the truncated gradient points the same way


@pytest.mark.parametrize("family", ["llama-tiny", "qwen3-tiny"])
def test_full_cache_replay_equals_rollout_and_checkpointing_changes_nothing(family, monkeypatch):
    """``lora``: one cache-free forward gives the rollout's log-probs. HF activation checkpointing (plus the LM head
    over chunks of positions) really recomputes in backward, saves no vocabulary-sized tensor, and leaves log-probs,
    gradients and the modules' train/eval modes as they were."""
    import pte.engine.replay as replay_mod

    monkeypatch.setattr(replay_mod, "HEAD_CHUNK", 7)  # several head chunks, the last one partial
    model, tok = _policy("lora", family)
    ids, am = batch(tok)
    out = generate(model, ids, am, CacheConfig(window=None), SamplingConfig(max_new_tokens=30, temperature=0.9),
                   [tok.eos_token_id], tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape[1] > 14 and out.tokens.shape[1] % 7 and bool((am == 0).any())
    m = out.mask.bool()
    vocab = model.get_output_embeddings().weight.shape[0]
    weights = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(1)) * out.mask
    calls = []
    model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    modes = [mod.training for mod in model.modules()]
    results = []
    for checkpointed in (False, True):
        if checkpointed:
            model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        calls.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.shape) or t, lambda t: t):
            lp = replay_logprobs(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.plan, 0.9,
                                 on_segment=lambda cols, seg: (seg * weights[:, cols]).sum().backward())
        torch.testing.assert_close(lp[m], out.logprobs[m], atol=1e-4, rtol=0)
        results.append((lp, _grads(model), len(calls), any(shape[-1] == vocab for shape in saved)))
    (lp0, g0, calls0, vocab0), (lp1, g1, calls1, vocab1) = results
    assert (calls0, calls1) == (1, 2)  # the checkpointed layer ran again in backward
    assert vocab0 and not vocab1  # the [B, T, V] logits are no longer kept for backward
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:  # the recompute in backward reorders float sums: equal up to rounding, relative to the gradient
        err = float((g1[name] - g0[name]).norm() / g0[name].norm().clamp(min=1e-12))
        assert err < 1e-5, f"{name}: relative gradient difference {err:.2e}"
    assert [mod.training for mod in model.modules()] == modes
