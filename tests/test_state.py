"""The thought state: RoPE un-rotation, GQA head flattening, and S after k events vs the direct formula."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, tiny

from pte.config import AdapterConfig, CacheConfig, PTEConfig, PTEExtensions, SamplingConfig
from pte.engine.adapters import PTEAdapter, attach_adapter, find_pte
from pte.engine.rollout import generate
from pte.engine.state import event_state, flatten_heads, global_state, normalize_rows, unrotate_keys


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                         "rope_theta": 10000.0}])
def test_unrotate_inverts_the_models_rope(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if rope is not None:
        cfg.rope_parameters = rope
    rotary = LlamaRotaryEmbedding(cfg)
    k = torch.randn(2, 2, 7, 16)
    pos = torch.tensor([[3, 4, 5, 90, 91, 92, 200], [0, 1, 2, 3, 4, 5, 6]])
    cos, sin = rotary(k, position_ids=pos)
    if rope is not None:
        assert rotary.attention_scaling != 1.0  # the division by cos^2 + sin^2 matters here
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(unrotate_keys(k_rot, cos, sin), k, atol=1e-5, rtol=1e-5)


def test_flatten_heads_matches_projection_layout():
    b, t, h, d = 2, 5, 3, 4
    proj_out = torch.randn(b, t, h * d)  # what k_proj returns
    cached = proj_out.view(b, t, h, d).transpose(1, 2)  # what the attention layer caches
    assert torch.equal(flatten_heads(cached), proj_out)


def test_state_formulas_by_hand():
    g, r, m = 3, 2, 4
    qa, ka, va = torch.randn(g, r), torch.randn(g, r), torch.randn(g, r)
    expected = sum(qa[:, None, :] @ ka[j][:, None] @ va[j][None, :] for j in range(g)).squeeze(1) / (math.sqrt(r) * g)
    torch.testing.assert_close(global_state(qa, ka, va), expected)
    ke, ve = torch.randn(1, 2, m, r), torch.randn(1, 2, m, r)
    s = event_state(qa.unsqueeze(0), ke, ve)  # [L=1, B=2, G, r]
    for b in range(2):
        torch.testing.assert_close(s[0, b], qa @ ke[0, b].T @ ve[0, b] / (math.sqrt(r) * m))
    n = normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 1e-6)
    torch.testing.assert_close(n, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


@pytest.mark.parametrize("family,write", [("llama-tiny", "linear"), ("qwen3-tiny", "linear"),
                                          ("llama-tiny", "softmax")])
def test_state_after_k_events_equals_direct_computation(monkeypatch, family, write):
    model, tok = tiny(family)
    attach_adapter(model, "pte", AdapterConfig(rank=8), PTEConfig(global_tokens=4,
                                                                  extensions=PTEExtensions(write=write)))
    pte = find_pte(model)
    layers = model.get_decoder().layers
    pre_rope_keys, values_seen = {i: [] for i in range(len(layers))}, {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        key_src = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj  # Qwen3 caches post-k_norm keys

        def keep_keys(m, a, o, i=i):
            if o.shape[0] == 3:  # k_norm also runs on the G=4 global tokens; keep only the batch's forwards
                pre_rope_keys[i].append(o.flatten(2))

        key_src.register_forward_hook(keep_keys)
        attn.v_proj.register_forward_hook(lambda m, a, o, i=i: values_seen[i].append(o))

    events = []
    original = PTEAdapter.observe_eviction

    def spy(self, evicted, active):
        original(self, evicted, active)
        events.append((evicted, active.clone(), self.bank.state.current.clone()))

    monkeypatch.setattr(PTEAdapter, "observe_eviction", spy)
    ids, am = batch(tok)
    window, e = 10, 3
    out = generate(model, ids, am, CacheConfig(window=window, evict_ratio=0.3), SamplingConfig(max_new_tokens=40),
                   [tok.eos_token_id], tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert len(events) == len(out.event_steps) >= 5

    # forward 0 is the prefill; forward j + 1 fed generated token j.
    keys = {i: torch.cat(v[1:], dim=1) for i, v in pre_rope_keys.items()}  # [B, fed, d_kv]
    vals = {i: torch.cat(v[1:], dim=1) for i, v in values_seen.items()}
    with torch.no_grad():
        qa_all, sg_all = pte.encoder.project_globals(layers)
        acc = {i: sg_all[i].expand(ids.shape[0], -1, -1).clone() for i in range(len(layers))}
        r = pte.adapter_cfg.rank
        seen = {i: [] for i in range(len(layers))}  # softmax: every (row, ka, va) evicted so far, one row at a time
        for k, (evicted, active, state) in enumerate(events):
            lo, hi = k * e, (k + 1) * e
            for i in range(len(layers)):
                # the cached (rotated, per-head) keys un-rotate to exactly the projection output
                cos, sin = model.get_decoder().rotary_emb(evicted.values[0], position_ids=evicted.positions)
                got = flatten_heads(unrotate_keys(evicted.keys[i], cos, sin))
                torch.testing.assert_close(got, keys[i][:, lo:hi], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(flatten_heads(evicted.values[i]), vals[i][:, lo:hi])
                ka = keys[i][:, lo:hi] @ pte.encoder.wa_k[i]
                va = vals[i][:, lo:hi] @ pte.encoder.wa_v[i]
                if write == "softmax":  # every kept token so far, pooled by one softmax per global query
                    seen[i] += [(b, ka[b], va[b]) for b in range(ids.shape[0]) if active[b]]
                    direct = acc[i].clone()
                    for b in range(ids.shape[0]):
                        kb = torch.cat([x for row, x, _ in seen[i] if row == b])
                        vb = torch.cat([y for row, _, y in seen[i] if row == b])
                        direct[b] += torch.softmax(qa_all[i] @ kb.T / math.sqrt(r), -1) @ vb
                    direct = direct / direct.norm(dim=-1, keepdim=True)
                    torch.testing.assert_close(state[i], direct, atol=1e-5, rtol=1e-5)
                    continue
                s_e = qa_all[i] @ ka.transpose(1, 2) @ va / (math.sqrt(r) * e)
                acc[i] = acc[i] + active.view(-1, 1, 1) * s_e
                direct = acc[i] / acc[i].norm(dim=-1, keepdim=True)
                torch.testing.assert_close(state[i], direct, atol=1e-5, rtol=1e-5)


def test_context_mix_event_by_event_equals_one_convolution_of_the_evicted_sequence():
    from pte.engine.writes import context_carry, context_mix

    gen = torch.Generator().manual_seed(0)
    seq = torch.randn(2, 3, 11, 5, generator=gen)  # [L, B, T, d]: every evicted token, oldest first
    kernel = torch.randn(2, 4, 5, generator=gen)  # c = 4
    # naive reference: out_t = sum_j kernel_j * x_{t-j}, x_{<0} = 0
    ref = torch.zeros_like(seq)
    for t in range(seq.shape[2]):
        for j in range(4):
            if t - j >= 0:
                ref[:, :, t] += kernel[:, j][:, None] * seq[:, :, t - j]
    carry, outs = torch.zeros(2, 3, 3, 5), []
    for lo, hi in [(0, 2), (2, 3), (3, 8), (8, 11)]:  # events of 2, 1, 5, 3 tokens
        outs.append(context_mix(seq[:, :, lo:hi], carry, kernel))
        carry = context_carry(seq[:, :, lo:hi], carry)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref)


def test_context_write_settings_are_validated():
    with pytest.raises(ValueError, match="pte.extensions.write_context"):
        PTEExtensions(write_context=0)
    with pytest.raises(ValueError, match="need pte.normalize: accumulate"):
        PTEConfig(extensions=PTEExtensions(write_context=3), normalize="recursive")
    assert PTEConfig(normalize="recursive").form() == "paper"  # the paper's write fits both forms


def test_softmax_pool_event_by_event_equals_one_softmax_over_the_kept_tokens():
    from pte.engine.writes import merge_pools, pool_event, pooled

    gen = torch.Generator().manual_seed(0)
    qa = torch.randn(2, 3, 4, generator=gen) * 30  # [L, G, r]; large scores: the running max must keep exp finite
    ke, ve = torch.randn(2, 2, 9, 4, generator=gen), torch.randn(2, 2, 9, 4, generator=gen)  # [L, B, T, r]
    events, keeps = [(0, 3), (3, 4), (4, 9)], [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]),
                                                torch.tensor([1.0, 1.0])]  # row 1 skips the middle event
    pool = None
    for (lo, hi), keep in zip(events, keeps, strict=True):
        pool = merge_pools(pool, pool_event(qa, ke[:, :, lo:hi], ve[:, :, lo:hi]), keep.view(1, -1, 1, 1))
    for b, kept in enumerate([list(range(9)), [0, 1, 2, 4, 5, 6, 7, 8]]):
        scores = qa @ ke[:, b, kept].transpose(-1, -2) / 2.0  # sqrt(r) = 2
        torch.testing.assert_close(pooled(pool)[:, b], torch.softmax(scores, -1) @ ve[:, b, kept])
    shifted = pool_event(qa, ke + torch.randn(2, 1, 1, 4, generator=gen) * 5, ve)  # the same vector on every key
    torch.testing.assert_close(pooled(merge_pools(None, shifted, torch.ones(1, 2, 1, 1))),
                               pooled(merge_pools(None, pool_event(qa, ke, ve), torch.ones(1, 2, 1, 1))))
    empty = merge_pools(None, pool_event(qa, ke, ve), torch.zeros(1, 2, 1, 1))  # nothing kept: zeros, not NaN
    assert torch.equal(pooled(empty), torch.zeros(2, 2, 3, 4))


def test_softmax_write_settings_are_validated():
    with pytest.raises(ValueError, match="pte.extensions.write = 'sum' is unknown"):
        PTEExtensions(write="sum")
    with pytest.raises(ValueError, match="need pte.normalize: accumulate"):
        PTEConfig(extensions=PTEExtensions(write="softmax"), normalize="recursive")
    with pytest.raises(ValueError, match="pte.extensions.grad_horizon"):
        PTEExtensions(grad_horizon=0)
