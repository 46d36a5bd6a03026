"""The per-chunk losses of every training objective, all through the same segment-wise replay (docs/method.md,
"Objectives"). ``grpo`` (the paper's Eq. 3) is :func:`grpo_chunk` over :mod:`pte.training.grpo`'s token objective;
besides it:

* ``sft``: teacher-forced NLL of a reference solution under the method's *training* cache. Every token sees exactly
  the context (prompt block + thinking window) and the thought state it would see while generating, so the state is
  taught to carry what the window loses.
* ``distill``: on-policy distillation from the model's own full-cache self, the reference of the paper's Eq. 3. The
  student (adapter on, bounded cache) samples; every sampled position is pulled toward the adapter-disabled,
  full-cache distribution over the whole vocabulary with TRL's generalized JSD (``beta = 1`` is the reverse
  KL(student || teacher) of Eq. 3, computed exactly instead of by a one-sample k3 estimate). The teacher runs without
  gradients as an incremental full-cache forward aligned with the student's replay chunks, so no ``[B, T, V]``
  tensor ever exists: at most one chunk's logits of each.

Also here: the recall metric's token positions (the tokens that need an evicted value,
:func:`pte.data.tasks.recall_spans`).
This module knows nothing about the optimiser, DeepSpeed or tracking; the trainer calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pte.data.tasks import recall_spans
from pte.engine.adapters import adapters_disabled
from pte.engine.cache import BoundedCache, CachePlan
from pte.engine.replay import chunk_logits, replay_logprobs
from pte.training.grpo import GRPOLossConfig, GRPOStats, per_token_objective

__all__ = ["ChunkTotals", "FullCacheTeacher", "ReplayGap", "SFTBatch", "batch_sensitivity", "completion_tokens",
           "eviction_sensitivity", "grpo_chunk", "jsd_loss", "label_agreement", "recall_positions", "replay_gap",
           "sft_batch", "sft_chunk", "sft_token_weights", "sft_weights", "token_kl"]


def completion_tokens(tokenizer, solutions: list[str], eos_id: int, pad_id: int,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference completions as the model would emit them: ``solution`` tokens then EOS, right-padded.

    Returns:
        ``tokens`` and ``mask`` ``[B, T]`` (mask 1 up to and including EOS), the layout of a rollout.
    """
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] + [eos_id] for s in solutions]
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, x in enumerate(ids):
        tokens[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    return tokens.to(device), mask.to(device)


def recall_positions(tokenizer, problems: list[str], solutions: list[str], width: int) -> torch.Tensor:
    """``[B, width]`` bool: the solution tokens that write a value recalled from an early variable.

    A token is a recall position when its characters overlap a span of :func:`pte.data.tasks.recall_spans` (tokenized
    as :func:`completion_tokens` tokenizes, so positions line up). Rows of tasks without recalls are all False.
    """
    out = torch.zeros(len(solutions), width, dtype=torch.bool)
    for b, (problem, solution) in enumerate(zip(problems, solutions, strict=True)):
        spans = recall_spans(problem, solution)
        if not spans:
            continue
        offsets = tokenizer(solution, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for t, (lo, hi) in enumerate(offsets[:width]):
            out[b, t] = any(lo < e and s < hi for s, e in spans)
    return out


@dataclass(frozen=True)
class ReplayGap:
    """How far replayed log-probs are from the rollout's, and where the worst token is (docs/method.md, "Replay
    check"). The check bounds ``prob``: a token's probability gap ``|p_replay - p_rollout|`` is at most ``p`` times its
    log-prob gap, so float noise in the log-prob of an unlikely sampled token (large, measured) barely moves it,
    while a replay that feeds the wrong context or state moves the probabilities of likely tokens."""

    prob: float = 0.0  # largest |exp(replay) - exp(rollout)| over valid tokens
    logprob: float = 0.0  # largest |replay - rollout| log-prob gap (reported, not checked)
    row: int = -1  # the worst token (by probability gap): row of the step's rollouts, completion column
    col: int = -1
    rollout_logprob: float = float("nan")
    replay_logprob: float = float("nan")

    def __or__(self, other: ReplayGap) -> ReplayGap:
        worst = self if self.prob >= other.prob else other
        return ReplayGap(worst.prob, max(self.logprob, other.logprob), worst.row, worst.col, worst.rollout_logprob,
                         worst.replay_logprob)


def replay_gap(lp: torch.Tensor, old_lp: torch.Tensor, mask: torch.Tensor, row0: int = 0, col0: int = 0) -> ReplayGap:
    """The :class:`ReplayGap` of one chunk: ``lp``, ``old_lp``, ``mask`` ``[B, n]``, rows from ``row0``, columns from
    ``col0`` of the step's rollouts."""
    valid = mask.bool()
    if not valid.any():
        return ReplayGap()
    lp = lp.detach().float()
    dp = torch.where(valid, (lp.exp() - old_lp.exp()).abs(), -1.0)
    b, t = divmod(int(dp.argmax()), dp.shape[1])
    return ReplayGap(float(dp[b, t]), float((lp - old_lp).abs()[valid].max()), row0 + b, col0 + t,
                     float(old_lp[b, t]), float(lp[b, t]))


@dataclass
class ChunkTotals:
    """What one optimizer step adds up over its replay chunks (the trainer logs it)."""

    loss: float = 0.0
    gap: ReplayGap = ReplayGap()  # for the replay check
    stats: GRPOStats | None = None

    def add(self, loss: torch.Tensor, gap: ReplayGap, stats: GRPOStats | None = None) -> None:
        self.loss += float(loss.detach())
        self.gap = self.gap | gap
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats + stats


def grpo_chunk(lp: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor | None, advantages: torch.Tensor,
               mask: torch.Tensor, weights: torch.Tensor, cfg: GRPOLossConfig,
               exact_kl: torch.Tensor | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """The GRPO loss of one replay chunk (:func:`pte.training.grpo.per_token_objective` times the step's token weights).

    Args:
        lp, old_lp, ref_lp, mask, weights: ``[B, n]`` the chunk's columns (``ref_lp`` None without a k3 KL).
        advantages: ``[B]``. exact_kl: ``[B, n]`` the exact KL per position (``train.grpo.kl_estimator: exact``) or
            None.

    Returns:
        ``(loss, stats)``.
    """
    obj, stats = per_token_objective(lp, old_lp, ref_lp, advantages, mask, cfg, exact_kl=exact_kl)
    return (obj * weights).sum(), stats


@dataclass
class SFTBatch:
    """Prompts and reference completions of one ``sft`` step, laid out as a rollout."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T] solution tokens + EOS, right-padded
    mask: torch.Tensor  # [B, T] 1 up to and including EOS
    recall: torch.Tensor  # [B, T] bool, tokens that write a recalled value


def sft_batch(tokenizer, prompts: list[str], problems: list[str], solutions: list[str], system: str | None,
              eos_id: int, device: torch.device | str = "cpu") -> SFTBatch:
    """Encode an ``sft`` step: chat-templated prompts (as rollouts encode them) and their worked solutions."""
    from pte.engine.inference import encode_prompts

    ids, pmask = encode_prompts(tokenizer, prompts, device=device, system=system)
    tokens, mask = completion_tokens(tokenizer, solutions, eos_id, tokenizer.pad_token_id, device)
    recall = recall_positions(tokenizer, problems, solutions, tokens.shape[1]).to(device)
    return SFTBatch(ids, pmask, tokens, mask, recall)


def sft_chunk(lp: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, recall: torch.Tensor,
              num_tokens: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sft`` loss of one replay chunk and its recall counts.

    Args:
        lp: ``[B, n]`` log-probs of the reference tokens. logits: ``[B, n, V]``. tokens, mask, recall: ``[B, n]``
            the chunk's columns. num_tokens: the step's total token weight (the loss is a weighted token mean over
            the step). weights: ``[B, n]`` token weights (:func:`sft_weights`, plus eviction weights); None = 1 per
            valid token (the plain NLL).

    Returns:
        ``loss`` (scalar, with graph) and ``[4]`` float64 sums: NLL, recall NLL, recall hits (argmax), recalls.
    """
    valid = mask.bool()
    r = recall & valid
    lp_d = lp.detach()
    hits = (logits.detach().argmax(-1) == tokens)[r]
    sums = torch.tensor([-float(lp_d[valid].sum()), -float(lp_d[r].sum()), float(hits.sum()), float(r.sum())],
                        dtype=torch.float64)
    weights = valid.float() if weights is None else weights * valid
    return -(lp * weights).sum() / num_tokens, sums


def sft_weights(mask: torch.Tensor, recall: torch.Tensor, recall_weight: float) -> torch.Tensor:
    """``[B, T]`` float token weights of the ``sft`` loss: 1 per valid token, ``recall_weight`` per valid recall token
    (``train.sft.recall_weight``, an oracle label of ``var_chain``: a research setting), 0 on padding."""
    valid = mask.bool()
    return valid.float() + (recall_weight - 1.0) * (recall & valid).float()


@torch.no_grad()
def eviction_sensitivity(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                         mask: torch.Tensor, plan: CachePlan) -> torch.Tensor:
    """``[B, T]`` how much eviction costs the frozen base at each reference token, teacher-forced:
    ``log p_full - log p_bounded`` (the NLL under ``plan`` minus the NLL under a full cache), adapters off, 0 on
    padding. Near 0 where the window holds what a token needs, large where it needs an evicted thought: a per-token
    signal any task has, the task-agnostic form of a recall label (docs/method.md, "Objectives")."""
    with adapters_disabled(model):
        bounded = replay_logprobs(model, prompt_ids, prompt_mask, tokens, mask, plan, 1.0)
        full = replay_logprobs(model, prompt_ids, prompt_mask, tokens, mask, CachePlan(plan.prompt_len, None, 0), 1.0)
    return (full - bounded) * mask


def batch_sensitivity(model: nn.Module, batch: SFTBatch, plan: CachePlan, micro_batch: int) -> torch.Tensor:
    """``[B, T]`` :func:`eviction_sensitivity` of a step's rows, ``micro_batch`` rows at a time (as the trainer replays
    them; the sensitivity stage calls this too, so the two give the same bits)."""
    return torch.cat([eviction_sensitivity(model, batch.prompt_ids[a : a + micro_batch],
                                           batch.prompt_mask[a : a + micro_batch], batch.tokens[a : a + micro_batch],
                                           batch.mask[a : a + micro_batch], plan)
                      for a in range(0, batch.tokens.shape[0], micro_batch)])


def sft_token_weights(model: nn.Module, batch: SFTBatch, plan: CachePlan, weights: torch.Tensor, alpha: float,
                      micro_batch: int, threshold: float | None = None,
                      sensitivity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` token weights of a teacher-forced step: ``weights`` (:func:`sft_weights`) plus ``alpha * max(0, s)``
    with ``s`` the :func:`eviction_sensitivity` (computed ``micro_batch`` rows at a time, only when ``alpha > 0``),
    or, with a ``threshold`` tau, plus ``alpha`` where ``s > tau`` (a selection); and ``s``'s
    :func:`label_agreement` with the recall labels (None when ``alpha`` is 0). A full cache (``plan.window`` None,
    ``lora``) evicts nothing, so its ``s`` is exactly 0 (the same forward twice) and is not computed: ``weights``
    are returned as they are, with no agreement. ``sensitivity``: ``s`` computed beforehand for these rows
    (:mod:`pte.training.sensitivity`), used as it is."""
    if alpha == 0.0 or plan.window is None:
        return weights, None
    sens = batch_sensitivity(model, batch, plan, micro_batch) if sensitivity is None else sensitivity
    extra = sens.clamp(min=0.0) if threshold is None else (sens > threshold).to(sens.dtype)
    return weights + alpha * extra, label_agreement(sens, batch.recall, batch.mask)


def label_agreement(sensitivity: torch.Tensor, recall: torch.Tensor, mask: torch.Tensor,
                    threshold: float = 0.5) -> torch.Tensor:
    """How well :func:`eviction_sensitivity` finds the labelled recall tokens (a diagnostic; the label trains nothing).

    Returns:
        ``[5]`` float64 sums: rows with a recall token, those whose most sensitive token is one, tokens above
        ``threshold`` nats, those that are recall tokens, recall tokens.
    """
    valid, r = mask.bool(), recall & mask.bool()
    has = r.any(-1)
    top = sensitivity.masked_fill(~valid, float("-inf")).argmax(-1)
    above = (sensitivity > threshold) & valid
    return torch.tensor([float(has.sum()), float((r.gather(1, top[:, None])[:, 0] & has).sum()), float(above.sum()),
                         float((above & r).sum()), float(r.sum())], dtype=torch.float64)


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float,
             num_tokens: float, temperature: float = 1.0) -> torch.Tensor:
    """TRL's generalized JSD (``GKDTrainer.generalized_jsd_loss``), summed over valid positions / ``num_tokens``.

    Args:
        student_logits, teacher_logits: ``[B, n, V]`` (one replay chunk).
        mask: ``[B, n]`` valid positions. beta: 0 = KL(teacher || student), 1 = KL(student || teacher) (Eq. 3).
        num_tokens: the optimiser step's valid-token count (so chunks and micro-batches add up to a token mean).
        temperature: the distributions are ``softmax(logits / temperature)``.
    """
    from trl.experimental.gkd import GKDTrainer

    labels = torch.where(mask.bool(), 0, -100)
    return GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta,
                                           temperature=temperature, num_items_in_batch=num_tokens)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, n]`` exact KL(student || teacher) per position (TRL's generalized JSD at beta 1, unreduced)."""
    from trl.experimental.gkd import GKDTrainer

    per_entry = GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), beta=1.0,
                                                temperature=temperature, reduction="none")
    return per_entry.sum(-1)


class FullCacheTeacher:
    """The adapter-disabled, full-cache model, fed chunk by chunk in step with a student's replay.

    ``logits(cols)`` returns the teacher's logits ``[B, len(cols), V]`` for the completion columns ``cols`` of a
    replay chunk (:func:`pte.engine.replay.replay_chunks`): the prompt block too for the first chunk (``cols.start ==
    0``), then the tokens fed before each column. Chunks must come in order. Its cache keeps every token (the teacher
    sees the whole thought); it holds no vocabulary-sized tensor beyond the chunk it returns.

    Args:
        model: the policy; its adapters are switched off for every teacher forward.
        prompt_ids, prompt_mask: ``[B, P]`` the student's prompt block. tokens: ``[B, T]`` the student's tokens.
    """

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor):
        self.model, self.prompt_ids, self.tokens = model, prompt_ids, tokens
        self.cache = BoundedCache(CachePlan(prompt_ids.shape[1], None, 0), prompt_mask)
        self.next_col = 0

    @torch.no_grad()
    def logits(self, cols: slice) -> torch.Tensor:
        if cols.start != self.next_col:
            raise RuntimeError(f"teacher chunks must be contiguous: expected column {self.next_col}, got {cols.start}")
        with adapters_disabled(self.model):
            logits = chunk_logits(self.model, self.cache, self.prompt_ids, self.tokens, max(cols.start - 1, 0),
                                  cols.stop - 1, first=cols.start == 0)
        self.next_col = cols.stop
        return logits
