"""Batched sampling under the bounded cache, updating the thought state at every eviction event (docs/method.md).

One decode loop serves training rollouts, evaluation, ``pte generate`` and the MLflow predictor:
prefill the left-padded prompt block, then one token per step for every row in lockstep. Before a
token is appended to a full thinking window, the oldest ``e`` thinking slots are evicted; with a PTE
adapter their keys/values update the state S, which the adapter uses from the next forward on.
Rows stop at their own EOS (later tokens are padding and masked; finished rows never update state).
With ``sync_ranks`` (training under several processes) the loop ends only when every rank's rows are done, so all
ranks run the same number of decode forwards, as ZeRO-3's per-forward parameter gathers require.
Memory is O(B (P + W)) for the cache plus O(L G r) for the state, whatever the generation length.

Returned log-probs are ``log_softmax(logits / temperature)`` of the chosen token (no top-k/top-p
truncation, 1.0 for greedy), the quantity GRPO's ratio needs and replay recomputes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from pte.config import CacheConfig, SamplingConfig
from pte.engine.adapters import find_pte
from pte.engine.cache import BoundedCache, CachePlan, plan_cache

__all__ = ["Rollout", "decode_model", "format_mask", "generate", "inverse_cdf", "model_forward", "pad_rollout",
           "sample_tokens", "shared_prompts"]

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """A batch of generations and what the cache did while producing them."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 = real prompt token
    tokens: torch.Tensor  # [B, T] generated tokens (pad after EOS)
    logprobs: torch.Tensor  # [B, T] fp32 log-prob of each token under the sampling distribution (temperature only)
    mask: torch.Tensor  # [B, T] 1 for generated tokens up to and including EOS
    finished: torch.Tensor  # [B] bool: ended with EOS (False = cut at max_new_tokens)
    num_evictions: torch.Tensor  # [B] eviction events while the row was still generating
    event_steps: list[int]  # generated-token indices j before whose append an eviction event happened
    max_cache_tokens: int  # most KV slots held at once (P + W when the window filled)
    plan: CachePlan  # the resolved cache layout

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` generated tokens per row (EOS included)."""
        return self.mask.sum(-1)


def pad_rollout(out: Rollout, length: int, pad_token_id: int) -> Rollout:
    """``out`` with its completion columns extended to ``length`` by masked padding (log-prob 0, mask 0).

    What :func:`generate` writes after a row's EOS, so replay and the loss treat the new columns like any padding: they
    carry zero weight and change neither the loss nor the gradient (only how many replay segments run).
    """
    extra = length - out.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a rollout of {out.tokens.shape[1]} tokens to {length}")
    if extra == 0:
        return out

    def grow(x: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([x, x.new_full((x.shape[0], extra), value)], dim=1)

    return dataclasses.replace(out, tokens=grow(out.tokens, pad_token_id), logprobs=grow(out.logprobs, 0.0),
                               mask=grow(out.mask, 0))


def _ranks_running(done: torch.Tensor, sync: bool) -> bool:
    """Whether any row still generates: on this process, or on any rank of the process group when ``sync``."""
    running = ~done.all()
    if sync:
        flag = running.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one scalar per step
        return bool(flag)
    return bool(running)


def format_mask(mask: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> the form the model's attention kernel takes (additive float for eager)."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def model_forward(model: nn.Module, cache: BoundedCache, input_ids: torch.Tensor, positions: torch.Tensor,
                  mask: torch.Tensor | None, logits_to_keep: int = 0) -> torch.Tensor:
    """One forward that appends ``input_ids`` to the cache.

    Args:
        input_ids: ``[B, n]``. positions: ``[B, n]`` absolute RoPE positions.
        mask: ``[B, 1, n, S]`` bool from the cache, or None when every slot is visible to a single query.
        logits_to_keep: 0 = logits for all n tokens, k = only the last k.

    Returns:
        ``[B, n or k, V]`` logits.
    """
    dtype = next(model.parameters()).dtype
    attn = None if mask is None else format_mask(mask, model, dtype)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions, past_key_values=cache.hf,
                use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits


def decode_model(model: nn.Module) -> nn.Module:
    """``model`` compiled for one-token decode steps over a static cache (``cache.compile_decode``), made once per
    model and kept on it: CUDA graphs (``reduce-overhead``) on a GPU, inductor's default on CPU, static shapes. A new
    batch shape compiles again (up to torch's recompile limit, then that shape runs eagerly)."""
    compiled = vars(model).get("_pte_decode_model")
    if compiled is None:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        compiled = torch.compile(model, dynamic=False, mode=mode)
        vars(model)["_pte_decode_model"] = compiled  # a plain attribute: not a submodule, not in the state dict
    return compiled


NUCLEUS_CANDIDATES = 256
"""Tokens looked at first for top-k / top-p sampling (the whole vocabulary only when they do not reach top_p)."""


def sampling_candidates(scaled: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens sampling may pick (HF semantics: top-k, then the smallest set whose mass reaches top_p).

    Args:
        scaled: ``[B, V]`` logits divided by the temperature.

    Returns:
        ``(logits [B, k], token ids [B, k])``, best first, those outside the set at ``-inf``; None when every token
        stays (``top_k`` 0 and ``top_p`` 1). Sorting and sampling over the whole vocabulary every step took about a
        third of a CPU evaluation; the set nearly always lies in the top few hundred tokens, so those are taken
        first and a row falls back to the full sort only when they hold less than ``top_p`` of the mass.
        Probabilities are of the whole vocabulary either way.
    """
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:  # HF: top-k first; top-p then renormalizes over its survivors
        top, idx = torch.topk(scaled, top_k, dim=-1)
        if top_p >= 1.0:
            return top, idx
        log_total = torch.logsumexp(top, dim=-1, keepdim=True)
    elif top_p >= 1.0:
        return None
    else:
        log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        top, idx = torch.topk(scaled, min(NUCLEUS_CANDIDATES, vocab), dim=-1)
        if not bool(((top - log_total).exp().sum(-1) >= top_p).all()):
            top, idx = torch.sort(scaled, descending=True, dim=-1)
    probs = (top - log_total).exp()
    remove = probs.cumsum(-1) - probs >= top_p  # the mass *before* this token already reaches top_p
    remove[..., 0] = False
    return top.masked_fill(remove, float("-inf")), idx


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of ``probs`` by inverting its CDF at ``uniform``.

    Args:
        probs: ``[B, K]`` non-negative weights per row (need not sum to 1; zero entries are never picked).
        uniform: ``[B]`` draws in ``[0, 1)``.

    Returns:
        ``[B]`` long: the first index whose cumulative weight exceeds ``uniform * total``, so index i is picked with
        probability ``probs[i] / total``. The CDF is accumulated in fp64: over a 150k-token vocabulary an fp32 sum
        would distort tokens below ~1e-7, and since ``uniform < 1`` the target stays strictly below the total.
    """
    cdf = probs.double().cumsum(-1)  # [B, K]
    target = uniform.double().unsqueeze(-1) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every row.

    Random stream: a sampling step draws exactly one fp64 uniform per row from ``generator``
    (``torch.rand(B, dtype=float64)``) and inverts the CDF of the row's (top-k / top-p filtered) distribution at it,
    whatever the vocabulary size or the filters; greedy draws nothing. ``torch.multinomial`` instead draws an
    exponential per vocabulary entry (``[B, V]`` noise per step) for one token.

    Args:
        logits: ``[B, V]`` float32.

    Returns:
        tokens ``[B]`` and their log-probs ``[B]`` under ``softmax(logits / temperature)`` (temperature 1 when greedy).
    """
    if cfg.greedy:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        scaled = logits / cfg.temperature
        logp = torch.log_softmax(scaled, -1)
        u = torch.rand(logits.shape[0], dtype=torch.float64, device=logits.device, generator=generator)  # [B]
        cand = sampling_candidates(scaled, cfg.top_k, cfg.top_p)
        if cand is None:
            tokens = inverse_cdf(logp.exp(), u)
        else:
            pick = inverse_cdf(cand[0].softmax(-1), u)
            tokens = cand[1].gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def shared_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of identical consecutive prompt rows (GRPO groups, evaluation samples), to prefill each run once.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.

    Returns:
        ``first`` ``[U]``: the first row of each run; ``index`` ``[B]``: the run of every row (``first[index]`` is the
        row whose prefill row b copies).
    """
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)  # [B-1]
    starts = torch.cat([same.new_ones(1), ~same])  # [B] a run begins
    return starts.nonzero().squeeze(-1), starts.long().cumsum(0) - 1


def _check_context(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    if prompt_len >= limit:
        raise ValueError(f"the prompt has {prompt_len} tokens but the model's context is {limit} "
                         "(config.max_position_embeddings); shorten the prompt.")
    if prompt_len + max_new_tokens > limit:
        log.warning("prompt (%d) + max_new_tokens (%d) exceeds the model's trained context (%d): positions past it "
                    "are out of distribution for RoPE even though the bounded cache keeps memory flat.",
                    prompt_len, max_new_tokens, limit)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache_cfg: CacheConfig,
             sampling: SamplingConfig, eos_token_ids: list[int] | tuple[int, ...], pad_token_id: int,
             generator: torch.Generator | None = None, progress: bool = False, sync_ranks: bool = False,
             share_prompts: bool = True, static_cache: bool = True) -> Rollout:
    """Sample continuations of a left-padded prompt batch under the bounded cache.

    Args:
        model: an HF causal LM (Llama / Qwen2 / Qwen3), optionally with a PTE or peft LoRA adapter.
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts and their mask.
        cache_cfg: window / budget / evict ratio (full cache when neither window nor budget is set).
        sampling: max_new_tokens, temperature (0 = greedy), top_p, top_k.
        eos_token_ids: tokens that end a row. pad_token_id: filler after a row ended.
        generator: explicit RNG for sampling (reproducible rollouts).
        progress: show a progress bar over generated tokens.
        sync_ranks: under an initialized process group of several ranks, keep decoding (finished rows emit masked
            padding) until every rank's rows are done, so all ranks run the same number of forwards (needed by
            DeepSpeed ZeRO-3, which gathers the partitioned weights inside every forward). Costs one scalar
            all-reduce per token. Without a process group, or with one rank, it changes nothing. The returned
            rollout is cut at this rank's longest row either way; training pads it to the longest of all ranks.
        share_prompts: prefill each run of identical consecutive prompt rows once and copy its cache and logits to
            the run's rows (:func:`shared_prompts`): a GRPO group of G rows costs one prompt forward, not G. The
            rows then decode as before (the PTE state before any event is the same for every row), so tokens and
            log-probs equal the unshared path's (bit for bit on CPU, tested; a GPU may pick other kernels for the
            smaller prefill batch, within rounding); False prefills every row.
        static_cache: with a bounded window, decode into preallocated ``P + W``-slot buffers written and evicted in
            place (:class:`pte.engine.cache.SlotLayer`) instead of a ``DynamicCache`` that concatenates every step; same
            tokens and log-probs up to rounding (tested against the dynamic path through eviction events).
            With ``cache_cfg.compile_decode`` the decode steps of a static cache run through :func:`decode_model`.

    Returns:
        A :class:`Rollout`.
    """
    bsz, p = prompt_ids.shape
    if p == 0 or bool((prompt_mask.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token")
    _check_context(model, p, sampling.max_new_tokens)
    plan = plan_cache(cache_cfg, p)
    cache = BoundedCache(plan, prompt_mask, static=static_cache)
    pte = find_pte(model)
    device = prompt_ids.device
    eos = torch.tensor(list(eos_token_ids), device=device)
    padded = bool((prompt_mask == 0).any()) or cache.static  # a static cache always hides its unused slots
    n_max = sampling.max_new_tokens
    sync = sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1)

    tokens = torch.full((bsz, n_max), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(bsz, n_max, dtype=torch.float32, device=device)
    mask = torch.zeros(bsz, n_max, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    evictions = torch.zeros(bsz, dtype=torch.long, device=device)
    events: list[int] = []

    step_model = decode_model(model) if cache_cfg.compile_decode and cache.static else model
    first, index = shared_prompts(prompt_ids, prompt_mask) if share_prompts and bsz > 1 else (None, None)
    if first is not None and len(first) == bsz:
        first = None  # every prompt differs: nothing to share
    try:
        if first is None:
            if pte is not None:
                pte.begin(bsz)
            logits = model_forward(model, cache, prompt_ids, cache.prompt_positions, cache.prefill_mask(), 1)
        else:
            if pte is not None:
                pte.begin(len(first))  # Normalize(S_g) for the prefilled rows; every row starts from the same state
            logits = model_forward(model, cache, prompt_ids[first], cache.prompt_positions[first],
                                   cache.prefill_mask()[first], 1)[index]
            cache.broadcast_rows(index)
            if pte is not None:
                pte.begin(bsz)
        from tqdm.auto import tqdm

        steps = tqdm(range(n_max), desc="generate", unit="tok", disable=not progress, leave=False)
        for t in steps:
            tok, lp = sample_tokens(logits[:, -1].float(), sampling, generator)
            tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
            tokens[:, t], logprobs[:, t] = tok, torch.where(done, torch.zeros_like(lp), lp)
            mask[:, t] = (~done).long()
            done = done | torch.isin(tok, eos)
            if t == n_max - 1 or not _ranks_running(done, sync):
                break
            if cache.needs_eviction(1):
                evicted = cache.evict()
                events.append(t)
                evictions += (~done).long()
                if pte is not None:
                    pte.observe_eviction(evicted, ~done)
            step_mask = cache.extend(cache.positions_for(t, 1))
            logits = model_forward(step_model, cache, tok.unsqueeze(1), cache.positions_for(t, 1),
                                   step_mask if padded else None, 1)
        steps.close()
    finally:
        if pte is not None:
            pte.end()
    length = int(mask.sum(-1).max())
    events = [j for j in events if j < length - 1]  # with sync_ranks, drop events past this rank's last fed token
    return Rollout(prompt_ids, prompt_mask, tokens[:, :length], logprobs[:, :length], mask[:, :length], done,
                   evictions, events, cache.max_slots, plan)
