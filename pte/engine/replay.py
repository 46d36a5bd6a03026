"""Teacher-forced log-probs under the rollout's own eviction schedule, segment by segment (docs/method.md).

Segment k holds the generated tokens fed between eviction events k and k+1. It runs as one chunk
against the cache as it was at the start of the segment (prompt block + kept thinking tokens), causal
inside the chunk, with the adapter using ``S^(k)``; then the same slots the rollout evicted are evicted
and the state is updated from their K/V. Every token therefore sees exactly the context and adapter it
saw while it was sampled, so replay log-probs equal rollout log-probs (the trainer checks this).

Memory: with ``on_segment`` the caller backpropagates each segment's loss right away; the cache K/V are
then detached, so activation memory is bounded by one segment, not by the sequence. This drops the
gradient paths through earlier segments' keys/values (a truncation across segments, like truncated
BPTT); gradients still reach the adapter through every token and the encoder through every event
(see :class:`pte.engine.state.SegmentState`). ``detach_cache=False`` keeps the whole graph for the exact
gradient (checks and small runs only).

The first segment of a bounded cache (prompt block + the whole window, W tokens) is replayed in chunks of e
tokens, each a "segment" of its own for ``on_segment`` and detaching, so no chunk is bigger than a later segment
(activation memory ~ P + e tokens, not P + W); its tokens keep their exact context, so log-probs are unchanged.
The full cache (``lora``, no PTE) is one cache-free forward over prompt + completion and its gradient is exact;
there, ``train.gradient_checkpointing`` recomputes each decoder layer (HF activation checkpointing; no cache has
to survive the recompute) and the LM head, chunk by chunk, in backward. Multi-token forwards get one float
additive mask (what sdpa would convert the bool mask to, bit for bit) shared by all layers, so autograd saves one
mask instead of one converted copy per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from pte.engine.adapters import find_pte
from pte.engine.cache import BoundedCache, CachePlan, event_steps, slot_attention_mask
from pte.engine.rollout import format_mask, model_forward
from pte.engine.state import SegmentState

__all__ = ["chunk_logits", "replay_chunks", "replay_logprobs", "segment_bounds", "shared_mask", "token_logprobs"]


def segment_bounds(plan: CachePlan, num_tokens: int) -> list[tuple[int, int]]:
    """Fed-token ranges ``[a, b)`` between eviction events for a generation of ``num_tokens`` tokens.

    The last generated token is never fed, so ``num_tokens - 1`` tokens are; segment k predicts tokens
    ``a+1 .. b`` (the first segment also predicts token 0 from the prompt block).
    """
    num_fed = max(num_tokens - 1, 0)
    bounds = [0, *event_steps(plan, num_fed), num_fed]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def replay_chunks(plan: CachePlan, num_tokens: int) -> list[tuple[int, int, bool]]:
    """``(a, b, evict_first)`` forward chunks of the replay: the segments, the first one cut into ``e``-token pieces.

    Only the first chunk of a segment after an event evicts first; chunks never cross an event, so each token
    sees the cache it was sampled with.
    """
    out = []
    for k, (a, b) in enumerate(segment_bounds(plan, num_tokens)):
        step = plan.evict if (k == 0 and plan.window is not None and plan.evict > 0) else max(b - a, 1)
        starts = list(range(a, b, step)) or [a]
        out += [(s, min(s + step, b), k > 0 and s == a) for s in starts]
    return out


def shared_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """sdpa converts a bool mask to ``0 / -inf`` in every layer and autograd saves each copy: convert it once."""
    if mask.shape[-2] == 1 or getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def chunk_logits(model: nn.Module, cache: BoundedCache, prompt_ids: torch.Tensor, tokens: torch.Tensor, a: int,
                 b: int, first: bool) -> torch.Tensor:
    """Feed one replay chunk, generated tokens ``a .. b-1`` (after the prompt block when ``first``), into ``cache``.

    Returns:
        ``[B, n, V]`` logits predicting tokens ``a+1 .. b`` (and token 0 first when ``first``): ``n = b - a (+ 1)``.
    """
    logits = []
    if first:
        logits.append(model_forward(model, cache, prompt_ids, cache.prompt_positions,
                                    shared_mask(model, cache.prefill_mask()), 1))
    if b > a:
        pos = cache.positions_for(a, b - a)
        logits.append(model_forward(model, cache, tokens[:, a:b], pos, shared_mask(model, cache.extend(pos))))
    return torch.cat(logits, dim=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at ``tokens``: ``[B, n, V], [B, n] -> [B, n]`` (fp32)."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


SegmentCallback = Callable[..., None]
"""``on_segment(cols, logprobs)``, or ``on_segment(cols, logprobs, logits)`` with ``with_logits``."""


HEAD_CHUNK = 256
"""Positions per LM-head chunk of a checkpointed full-cache replay."""
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Families whose logits are exactly ``lm_head(last_hidden_state)`` (no softcapping or logit scaling)."""


@contextmanager
def _checkpointing(layers: list[nn.Module]) -> Iterator[None]:
    """Let HF recompute ``layers`` (decoder layers with activation checkpointing on) in the forwards inside.

    HF checkpoints a layer only in training mode, and the policy runs in eval mode; only the layer modules
    themselves are switched (not their children), so dropout and adapters keep their eval behaviour and the
    log-probs do not change.
    """
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.training = mode


def _head_logprobs(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return token_logprobs(head(hidden), tokens, temperature)


def _full_cache_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """``[B, T]`` log-probs of every generated token from one cache-free forward over prompt + completion.

    Same positions and visibility as the full-cache rollout (left-padded prompt slots hidden, causal after), so
    the same log-probs. With activation checkpointing on (``train.gradient_checkpointing``), HF recomputes the
    decoder layers in backward (no cache has to survive the recompute), and the LM head + log-softmax run over
    ``HEAD_CHUNK`` positions at a time, recomputed in backward too: the ``[B, T, V]`` logits, their softmax and their
    gradient never exist at once (what TRL's selective log-softmax does for its logits).
    """
    num_tokens = tokens.shape[1]
    cache = BoundedCache(CachePlan(prompt_ids.shape[1], None, 0), prompt_mask)  # positions only; its K/V stay empty
    fed = num_tokens - 1
    positions = torch.cat([cache.prompt_positions, cache.positions_for(0, fed)], dim=1)
    valid = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(prompt_mask.shape[0], fed, dtype=torch.bool)], dim=1)
    mask = slot_attention_mask(valid, valid.shape[1])
    inputs = {"input_ids": torch.cat([prompt_ids, tokens[:, :fed]], dim=1), "position_ids": positions,
              "attention_mask": format_mask(shared_mask(model, mask), model, next(model.parameters()).dtype),
              "use_cache": False}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    with _checkpointing(layers):
        if not layers or getattr(model.config, "model_type", None) not in _PLAIN_HEAD:
            return token_logprobs(model(**inputs, logits_to_keep=num_tokens).logits, tokens, temperature)
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, -num_tokens:]
    head = model.get_output_embeddings()
    return torch.cat([checkpoint(_head_logprobs, head, hidden[:, a : a + HEAD_CHUNK], tokens[:, a : a + HEAD_CHUNK],
                                 temperature, use_reentrant=False) for a in range(0, num_tokens, HEAD_CHUNK)], dim=1)


def replay_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                    mask: torch.Tensor, plan: CachePlan, temperature: float = 1.0,
                    on_segment: SegmentCallback | None = None, detach_cache: bool = True,
                    with_logits: bool = False) -> torch.Tensor:
    """Recompute the log-prob of every generated token under the bounded cache.

    Args:
        model: the policy (base, peft LoRA or PTE); its adapters decide what is trained.
        prompt_ids, prompt_mask: ``[B, P]`` the rollout's left-padded prompt block.
        tokens, mask: ``[B, T]`` generated tokens and their validity (1 up to and including EOS).
        plan: the rollout's cache layout (same P, W and e give the same events).
        temperature: the sampling temperature (log-probs are of ``softmax(logits / temperature)``).
        on_segment: called as ``on_segment(cols, logprobs[:, cols])`` after each chunk (a segment, or an e-token
            piece of the first one; see :func:`replay_chunks`), typically to backpropagate that chunk's share of
            the loss; the returned tensor is then detached.
        detach_cache: detach cached K/V after each chunk (always when ``on_segment`` backpropagates).
        with_logits: also pass the chunk's logits ``[B, n, V]`` (``n = len(cols)``, with their graph) to
            ``on_segment``, for losses over the whole vocabulary (distillation); the full cache then runs through
            the segment loop too (one chunk), never the checkpointed whole-sequence forward.

    Returns:
        ``[B, T]`` fp32 log-probs (with their graph when ``on_segment`` is None and grad is enabled).
    """
    bsz, num_tokens = tokens.shape
    pte = find_pte(model)
    if pte is not None and not pte.bank.enabled:  # adapters off (the frozen base): no state is read, none is built,
        pte = None  # so the replay is the plain model's, the same bits as any other method's base
    if plan.window is None and pte is None and not with_logits:  # no events: the whole completion is one segment
        lp = _full_cache_logprobs(model, prompt_ids, prompt_mask, tokens, temperature)
        if on_segment is not None:
            on_segment(slice(0, num_tokens), lp)
            lp = lp.detach()
        return lp
    cache = BoundedCache(plan, prompt_mask)
    lengths = mask.sum(-1)
    state = SegmentState(pte.encoder, model.get_decoder().layers, bsz, pte.pte_cfg) if pte is not None else None
    pieces = []
    try:
        for k, (a, b, evict_first) in enumerate(replay_chunks(plan, num_tokens)):
            if evict_first:
                evicted = cache.evict()
                if state is not None:
                    state.observe(*pte.pre_rope(evicted), active=lengths > a + 1)
            if state is not None:
                pte.bank.state = state
                state.build()
            chunk = chunk_logits(model, cache, prompt_ids, tokens, a, b, first=k == 0)
            cols = slice(0 if k == 0 else a + 1, b + 1)
            lp = token_logprobs(chunk, tokens[:, cols], temperature)
            if on_segment is not None:
                on_segment(cols, lp, chunk) if with_logits else on_segment(cols, lp)
                lp = lp.detach()
            pieces.append(lp)
            if detach_cache or on_segment is not None:
                for layer in cache.hf.layers:
                    layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    finally:
        if pte is not None:
            pte.end()
    return torch.cat(pieces, dim=1)
