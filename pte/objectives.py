"""Training objectives besides GRPO, through the same segment-wise replay (docs/method.md, "Objectives").

* ``sft``: teacher-forced NLL of a reference solution under the method's *training* cache. Every token sees exactly
  the context (prompt block + thinking window) and the thought state it would see while generating, so the state is
  taught to carry what the window loses.
* ``distill``: on-policy distillation from the model's own full-cache self, the reference of the paper's Eq. 3. The
  student (adapter on, bounded cache) samples; every sampled position is pulled toward the adapter-disabled,
  full-cache distribution over the whole vocabulary with TRL's generalized JSD (``beta = 1`` is the reverse
  KL(student || teacher) of Eq. 3, computed exactly instead of by a one-sample k3 estimate). The teacher runs without
  gradients as an incremental full-cache forward aligned with the student's replay chunks, so no ``[B, T, V]``
  tensor ever exists: at most one chunk's logits of each.

Also here: the recall metric's token positions (the tokens that need an evicted value, :func:`pte.tasks.recall_spans`).
This module knows nothing about the optimiser, DeepSpeed or tracking; the trainer calls it.
"""

from __future__ import annotations

import torch
from torch import nn

from pte.adapters import adapters_disabled
from pte.cache import BoundedCache, CachePlan
from pte.replay import shared_mask
from pte.rollout import model_forward
from pte.tasks import recall_spans

__all__ = ["FullCacheTeacher", "completion_tokens", "jsd_loss", "recall_positions", "token_kl"]


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

    A token is a recall position when its characters overlap a span of :func:`pte.tasks.recall_spans` (tokenized
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
    replay chunk (:func:`pte.replay.replay_chunks`): the prompt block too for the first chunk (``cols.start == 0``),
    then the tokens fed before each column. Chunks must come in order. Its cache keeps every token (the teacher sees
    the whole thought); it holds no vocabulary-sized tensor beyond the chunk it returns.

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
        out = []
        with adapters_disabled(self.model):
            if cols.start == 0:
                out.append(model_forward(self.model, self.cache, self.prompt_ids, self.cache.prompt_positions,
                                         shared_mask(self.model, self.cache.prefill_mask()), 1))
            a, b = max(cols.start - 1, 0), cols.stop - 1
            if b > a:
                pos = self.cache.positions_for(a, b - a)
                out.append(model_forward(self.model, self.cache, self.tokens[:, a:b], pos,
                                         shared_mask(self.model, self.cache.extend(pos))))
        self.next_col = cols.stop
        return torch.cat(out, dim=1)
