"""Independent references for the bounded cache and the thought state.

``naive_logits`` recomputes a whole generated sequence in ONE forward with no KV cache: an explicit
[N x N] mask lets each fed token see the valid prompt tokens plus the thinking tokens still kept at the
time it was fed, and positions are the true token indices. For PTE, every token gets the state of its
own segment through forward hooks (the adapter's own forward is bypassed), and the states are built
by a fixed-point iteration from pre-RoPE keys/values captured with hooks on the projections, using the
paper's formula written out directly. Nothing here calls the cache, state or rollout code under test.
"""

from __future__ import annotations

import math

import torch

from pte.engine.adapters import StateLoRALinear, adapters_disabled, find_pte


def eviction_schedule(window: int | None, evict: int, num_fed: int) -> list[int]:
    """Fed-token indices before which an event happens (written independently of pte.engine.cache)."""
    if window is None:
        return []
    steps, kept = [], 0
    for j in range(num_fed):
        if kept == window:
            steps.append(j)
            kept -= evict
        kept += 1
    return steps


def naive_mask(prompt_mask: torch.Tensor, num_fed: int, window: int | None, evict: int) -> torch.Tensor:
    """``[B, 1, N, N]`` bool mask over [prompt block][fed tokens], N = P + num_fed."""
    bsz, p = prompt_mask.shape
    n = p + num_fed
    mask = torch.zeros(bsz, n, n, dtype=torch.bool)
    valid = prompt_mask.bool()
    for i in range(p):
        mask[:, i, : i + 1] = valid[:, : i + 1]
        mask[:, i, i] = True
    events = eviction_schedule(window, evict, num_fed)
    for j in range(num_fed):
        start = evict * sum(1 for s in events if s <= j)
        mask[:, p + j, :p] = valid
        mask[:, p + j, p + start : p + j + 1] = True
    return mask.unsqueeze(1)


def naive_positions(prompt_mask: torch.Tensor, num_fed: int) -> torch.Tensor:
    lengths = prompt_mask.sum(-1, keepdim=True)
    prompt_pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    return torch.cat([prompt_pos, lengths + torch.arange(num_fed).unsqueeze(0)], dim=1)


def _normalize(s: torch.Tensor, eps: float) -> torch.Tensor:
    return s / s.norm(dim=-1, keepdim=True).clamp_min(eps)


def _global_terms(model, pte):
    """Per layer: (qa [G, r], S_g [G, r]) straight from the paper's formula."""
    enc, cfg = pte.encoder, pte.pte_cfg
    out = []
    for i, layer in enumerate(model.get_decoder().layers):
        h = enc.global_tokens[i] if cfg.per_layer_globals else enc.global_tokens
        x = layer.input_layernorm(h.unsqueeze(0))[0]
        attn = layer.self_attn
        q, k, v = (m.base_layer(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):
            d = attn.head_dim
            q = attn.q_norm(q.view(len(x), -1, d)).reshape(len(x), -1)
            k = attn.k_norm(k.view(len(x), -1, d)).reshape(len(x), -1)
        qa, ka, va = q @ enc.wa_q[i], k @ enc.wa_k[i], v @ enc.wa_v[i]
        g, r = qa.shape
        s_g = qa @ ka.T @ va / (math.sqrt(r) * g) if cfg.use_global_state else torch.zeros_like(qa)
        out.append((qa, s_g))
    return out


def _forward_capture(model, ids, mask, pos, token_states):
    """One cache-free forward; per-token PTE states via hooks; returns logits and pre-RoPE K/V per layer."""
    pte = find_pte(model)
    hooks, keys, values = [], {}, {}
    layers = model.get_decoder().layers
    for li, layer in enumerate(layers):
        attn = layer.self_attn
        for mod in attn.modules():
            if isinstance(mod, StateLoRALinear) and token_states is not None:
                def add_delta(m, inp, out, li=li):
                    h = torch.nn.functional.linear(inp[0], m.pte_down)  # [B, N, r]
                    h = torch.einsum("bnr,bngr->bng", h, token_states[li])
                    return out + m.scaling * torch.nn.functional.linear(h, m.pte_up)
                hooks.append(mod.register_forward_hook(add_delta))
        key_src = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        hooks.append(key_src.register_forward_hook(lambda m, i, o, li=li: keys.__setitem__(li, o)))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, i, o, li=li: values.__setitem__(li, o)))
    try:
        ctx = adapters_disabled(model) if pte is not None else torch.no_grad()
        with ctx, torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    bsz, n = ids.shape
    keys = {li: k.reshape(bsz, n, -1) for li, k in keys.items()}  # heads flattened, head-major
    return logits, keys, values


def naive_logits(model, prompt_ids, prompt_mask, tokens, gen_mask, window, evict):
    """Logits ``[B, T, V]`` for every generated token, recomputed without a cache.

    Returns ``(logits, states)``: ``states[k]`` is the list over layers of ``[B, G, r]`` after k events.
    """
    bsz, p = prompt_ids.shape
    num_fed = tokens.shape[1] - 1
    ids = torch.cat([prompt_ids, tokens[:, :num_fed]], dim=1)
    mask, pos = naive_mask(prompt_mask, num_fed, window, evict), naive_positions(prompt_mask, num_fed)
    pte = find_pte(model)
    events = eviction_schedule(window, evict, num_fed)
    lengths = gen_mask.sum(-1)
    if pte is None:
        logits, _, _ = _forward_capture(model, ids, mask, pos, None)
        return logits[:, p - 1 : p - 1 + tokens.shape[1]], []
    cfg, terms = pte.pte_cfg, _global_terms(model, pte)
    acc = [s_g.unsqueeze(0).expand(bsz, -1, -1).clone() for _, s_g in terms]
    states = [[_normalize(a, cfg.eps) for a in acc]]
    for k in range(len(events) + 1):
        seg_of = torch.tensor([0] * p + [sum(1 for s in events if s <= j) for j in range(num_fed)])
        per_token = [torch.stack([states[min(int(s), k)][li] for s in seg_of], dim=1) for li in range(len(acc))]
        logits, keys, values = _forward_capture(model, ids, mask, pos, per_token)
        if k == len(events):
            break
        lo = p + k * evict  # event k+1 evicts fed tokens [k e, (k+1) e)
        active = (lengths > events[k] + 1).view(-1, 1, 1).float()
        new_states = []
        for li, (qa, _) in enumerate(terms):
            ke = keys[li][:, lo : lo + evict] @ pte.encoder.wa_k[li]
            ve = values[li][:, lo : lo + evict] @ pte.encoder.wa_v[li]
            s_e = qa @ ke.transpose(1, 2) @ ve / (math.sqrt(qa.shape[1]) * evict)
            if not cfg.event_updates:
                s_e = torch.zeros_like(s_e)
            if cfg.normalize == "recursive":
                new_states.append(active * _normalize(states[-1][li] + s_e, cfg.eps) + (1 - active) * states[-1][li])
            else:
                acc[li] = acc[li] + active * s_e
                new_states.append(_normalize(acc[li], cfg.eps))
        states.append(new_states)
    return logits[:, p - 1 : p - 1 + tokens.shape[1]], states
