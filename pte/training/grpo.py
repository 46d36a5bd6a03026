"""GRPO math: group-normalised advantages, the PPO-clip token objective, k3 KL and loss aggregation.

Implements the policy-gradient part of the paper's cache-aware objective (Eq. 3, of the same form as Eq. 1):

    L^D_GRPO(θ_g; θ_ref) = E_{y ~ π^D_θg(.|p)} [ r(y) - β · KL(π^D_θg(.|p) || π_θref(.|p)) ]

with the group-normalised reward of §2.1, ``r_i = (s_i - mean(s)) / (std(s) + eps)`` over the ``n`` completions of one
prompt (population std, as the paper), and the usual GRPO machinery the paper leaves out, taken from TRL 1.16's
``GRPOTrainer._compute_loss`` (and tested against it): the token-level ratio ``ρ = exp(logπ - logπ_old)``, the clipped
surrogate ``-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)``, the per-token k3 KL estimator ``exp(ref - logπ) - (ref - logπ) - 1``
(multiplied by ``ρ`` when ``use_bias_correction_kl``, TRL's default) and TRL's ``loss_type`` aggregations.

Every aggregation is a fixed per-token weighting: ``loss == (per_token_objective * token_weights(mask, ...)).sum()``.
The weights depend only on the full completion mask, so the training loop can compute the loss segment by segment
(column chunks of the ``[B, T]`` grid), call ``backward`` per segment and get the same gradient as one full pass.
``grpo_loss`` goes through the same two functions, so there is one code path.

What it does not know about: models, caches, eviction segments, tokenizers, rewards functions, processes and
optimiser steps. Callers pass log-probs that they computed (under whatever cache policy D) and, for gradient
accumulation or data parallelism, the batch totals (``num_sequences``, ``num_tokens``) that one optimiser step
averages over.

Shapes: ``N`` completions in a batch, ``G`` per prompt (rows group-contiguous: prompt0 × G, prompt1 × G, ...);
``B`` rows and ``T`` completion positions in a loss batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pte.config import LOSS_TYPES, TrainConfig, check_loss_settings

LossType = Literal["grpo", "dapo", "dr_grpo"]
RewardScale = Literal["group", "batch", "none"]
REWARD_SCALES: tuple[str, ...] = ("group", "batch", "none")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; empty slices give 0, never NaN.

    Args:
        x: Values, any shape, e.g. ``[B, T]``.
        mask: Same shape as ``x`` (bool or 0/1).
        dim: Reduce over this dimension; ``None`` reduces over everything.

    Returns:
        Scalar tensor if ``dim`` is ``None``, else ``x`` with ``dim`` removed (e.g. ``[B]``).
    """
    m = mask.to(x.dtype)
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # padding values (even NaN/inf) must not leak
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: RewardScale = "group",
    eps: float = 1e-4,
    unbiased: bool = False,
) -> Tensor:
    """Group-normalised advantages ``(r_i - mean_group) / (std + eps)``.

    The baseline is always the mean of the row's own group. ``scale`` picks the std as TRL's ``scale_rewards``:
    ``"group"`` the std of the row's group, ``"batch"`` the std of all ``N`` rewards, ``"none"`` no division (Dr. GRPO).

    The default std is the population std (divide by ``G``), as the paper's §2.1 formula. TRL 1.16 uses
    ``trl.trainer.utils.nanstd``, which applies Bessel's correction (divide by ``G - 1``); ``unbiased=True`` gives
    exactly TRL's advantages. The paper puts its ``ε`` inside the square root (``sqrt(var + ε)``); like TRL we add
    ``eps`` to the std, which differs by ``O(eps / std)``. A group whose rewards are all equal gets zero advantages.

    Args:
        rewards: ``[N]`` scalar rewards, rows group-contiguous, ``N`` divisible by ``group_size``.
        group_size: ``G``, completions per prompt.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: Added to the std before dividing.
        unbiased: Bessel-corrected std (TRL) instead of the population std (paper).

    Returns:
        ``[N]`` advantages, same dtype as ``rewards``.

    Raises:
        ValueError: If the shape, ``group_size`` or ``scale`` is invalid.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}; flatten the per-row rewards")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide N={rewards.numel()}; pass G completions per prompt"
        )
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale={scale!r} is invalid; use one of {REWARD_SCALES}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return advantages
    source = grouped if scale == "group" else rewards.view(1, -1)
    if source.size(1) > 1:
        std = source.std(dim=1, unbiased=unbiased, keepdim=True)
    else:  # one sample: no spread, and unbiased std would be NaN
        std = torch.zeros_like(source[:, :1])
    std = std.expand(-1, group_size).reshape(-1) if scale == "group" else std.reshape(()).expand_as(rewards)
    return advantages / (std + eps)


@dataclass(frozen=True)
class GRPOLossConfig:
    """Loss settings, with the names and meanings of TRL 1.16's ``GRPOConfig`` (and its defaults, for the tests
    against TRL); the trainer builds it from the ``train.grpo`` section with :meth:`from_config`, and both are validated
    by the same ``pte.config.check_loss_settings``.

    Attributes:
        loss_type: ``"grpo"`` mean over each sequence's tokens, then over sequences; ``"dapo"`` sum over all tokens
            divided by the number of valid tokens in the batch; ``"dr_grpo"`` sum over all tokens divided by
            ``rows * max_completion_length``. TRL's default is ``"dapo"``.
        epsilon: Lower clip ε (ratio floor ``1 - ε``).
        epsilon_high: Upper clip (ratio ceiling ``1 + ε_high``); ``None`` means ``epsilon``.
        beta: KL coefficient; 0 (TRL's default) skips the KL term.
        max_completion_length: Constant normaliser of ``"dr_grpo"``; required for it.
        delta: Optional upper clamp of the unclipped ratio (INTELLECT-2 two-sided clipping); ``None`` disables.
        use_bias_correction_kl: Multiply the per-token KL by the (differentiable) ratio, as TRL's default does.
    """

    loss_type: LossType = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None
    delta: float | None = None
    use_bias_correction_kl: bool = True

    def __post_init__(self) -> None:
        check_loss_settings(self.loss_type, self.epsilon, self.epsilon_high, self.beta, self.delta)
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
            raise ValueError(f"max_completion_length = {self.max_completion_length!r}: loss_type 'dr_grpo' needs a "
                             "positive integer (its constant normaliser, train.rollout.max_completion_length).")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GRPOLossConfig:
        """The loss settings of ``train.grpo`` and ``train.rollout`` (the single source of truth for training)."""
        g = cfg.grpo
        return cls(loss_type=g.loss_type, epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                   max_completion_length=cfg.rollout.max_completion_length, delta=g.delta,
                   use_bias_correction_kl=g.use_bias_correction_kl)

    def upper_epsilon(self) -> float:
        """The effective ε_high: ``epsilon_high`` if set, else ``epsilon``."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class GRPOStats:
    """Detached per-row sums behind TRL's loss metrics; add two (disjoint column chunks) with ``+``.

    Attributes:
        tokens: ``[B]`` valid tokens per row.
        low_clipped: ``[B]`` valid tokens with ``ρ < 1 - ε`` and ``A < 0``.
        high_clipped: ``[B]`` valid tokens with ``ρ > 1 + ε_high`` and ``A > 0``.
        region_clipped: ``[B]`` valid tokens in either clipped region.
        kl: ``[B]`` sum over valid tokens of the per-token KL term as used in the loss, or ``None`` without a
            reference.
    """

    tokens: Tensor
    low_clipped: Tensor
    high_clipped: Tensor
    region_clipped: Tensor
    kl: Tensor | None

    def __add__(self, other: GRPOStats) -> GRPOStats:
        kl = None if self.kl is None or other.kl is None else self.kl + other.kl
        return GRPOStats(
            tokens=self.tokens + other.tokens,
            low_clipped=self.low_clipped + other.low_clipped,
            high_clipped=self.high_clipped + other.high_clipped,
            region_clipped=self.region_clipped + other.region_clipped,
            kl=kl,
        )

    def as_dict(self) -> dict[str, float]:
        """TRL's metric names and definitions (one process).

        ``kl`` and ``clip_ratio/*_mean`` are means over all valid tokens of the batch; ``clip_ratio/low_min`` and
        ``clip_ratio/high_max`` are the min/max over rows of the per-row fraction, ignoring rows with no valid token
        (NaN if there is none). ``kl`` is present only if a reference was given (TRL logs it only when ``beta != 0``).
        """
        n = self.tokens.sum().clamp(min=1.0)
        has = self.tokens > 0
        out = {
            "clip_ratio/low_mean": (self.low_clipped.sum() / n).item(),
            "clip_ratio/high_mean": (self.high_clipped.sum() / n).item(),
            "clip_ratio/region_mean": (self.region_clipped.sum() / n).item(),
            "clip_ratio/low_min": (self.low_clipped[has] / self.tokens[has]).min().item() if has.any() else math.nan,
            "clip_ratio/high_max": (self.high_clipped[has] / self.tokens[has]).max().item() if has.any() else math.nan,
        }
        if self.kl is not None:
            out["kl"] = (self.kl.sum() / n).item()
        return out


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of KL(π || π_ref) per sampled token, exactly as TRL: ``exp(ref - logp) - (ref - logp) - 1``.

    Args:
        logprobs: ``[B, T]`` policy log-probs of the sampled tokens (differentiable).
        ref_logprobs: ``[B, T]`` reference log-probs of the same tokens.

    Returns:
        ``[B, T]`` non-negative estimates (unmasked).
    """
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


def token_weights(
    mask: Tensor,
    loss_type: LossType,
    max_completion_length: int | None = None,
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
) -> Tensor:
    """Per-token weights ``w`` such that the loss is ``(per_token_objective * w).sum()``, as TRL aggregates.

    ``grpo``: ``w = m / (|y_i| * S)`` (TRL: ``((l * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()``);
    ``dapo``: ``w = m / max(N_tok, 1)`` (TRL: ``(l * m).sum() / num_items_in_batch``);
    ``dr_grpo``: ``w = m / (S * max_completion_length)`` (TRL: ``(l * m).sum() / (B * max_completion_length)``).
    ``S`` is ``num_sequences`` (default ``B``) and ``N_tok`` is ``num_tokens`` (default ``mask.sum()``). For gradient
    accumulation over micro-batches pass the totals of the rows one optimiser step sums over; TRL divides ``grpo`` and
    ``dr_grpo`` by the number of accumulation steps, which equals this when micro-batches have equal row counts. Under
    data parallelism with mean-reduced gradients, pass the global token count divided by the world size, as TRL does.

    Args:
        mask: ``[B, T]`` completion mask (bool or 0/1), the FULL mask, not a segment of it.
        loss_type: ``"grpo"``, ``"dapo"`` or ``"dr_grpo"``.
        max_completion_length: Required for ``"dr_grpo"``.
        num_sequences: Rows averaged over; default ``B``.
        num_tokens: Valid tokens averaged over (``"dapo"``); default ``mask.sum()``.

    Returns:
        ``[B, T]`` float weights, zero where ``mask`` is zero; slice columns for a segment.
    """
    m = mask.to(torch.float32) if not mask.is_floating_point() else mask
    rows = float(mask.size(0) if num_sequences is None else num_sequences)
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * rows)
    if loss_type == "dapo":
        total = m.sum() if num_tokens is None else torch.tensor(float(num_tokens), dtype=m.dtype, device=m.device)
        return m / total.clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"max_completion_length={max_completion_length} must be a positive int for dr_grpo")
        return m / (rows * max_completion_length)
    raise ValueError(f"loss_type={loss_type!r} is invalid; use one of {LOSS_TYPES}")


def per_token_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    exact_kl: Tensor | None = None,
) -> tuple[Tensor, GRPOStats]:
    """Per-token loss ``-min(ρA, clip(ρ)A) + β·KL`` (TRL's ``per_token_loss``) for a full batch or a column chunk.

    Masked positions are neutralised before ``exp``, so padding values (even inf/NaN) give a zero loss and an exactly
    zero gradient there. Computation is in at least fp32.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (differentiable).
        old_logprobs: ``[B, T]`` log-probs at sampling time (the rollout's), detached.
        ref_logprobs: ``[B, T]`` reference log-probs, or ``None``; required when ``cfg.beta != 0``.
        advantages: ``[B]`` per-sequence advantages.
        mask: ``[B, T]`` completion mask (bool or 0/1) for the same columns.
        cfg: Loss settings.
        exact_kl: ``[B, T]`` the exact per-position KL(policy || reference) over the whole vocabulary (with its
            graph), used instead of the k3 estimate from ``ref_logprobs`` (``train.grpo.kl_estimator: exact``).

    Returns:
        ``([B, T]`` per-token loss, zero where masked; detached stats for these columns).
    """
    if exact_kl is not None:
        ref_logprobs = None
    if cfg.beta != 0.0 and ref_logprobs is None and exact_kl is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logprobs; pass the reference log-probs or set beta=0.0")
    if logprobs.shape != mask.shape or old_logprobs.shape != mask.shape or advantages.shape != mask.shape[:1]:
        raise ValueError(
            f"shapes disagree: logprobs {tuple(logprobs.shape)}, old {tuple(old_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}; expected [B, T], [B, T], [B, T], [B]"
        )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    valid = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logp = logprobs.to(dtype)
    log_ratio = torch.where(valid, logp - old_logprobs.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype).unsqueeze(1)
    eps_low, eps_high = cfg.epsilon, cfg.upper_epsilon()
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    loss = -torch.min(unclipped * adv, clipped * adv)

    kl_sum = None
    if ref_logprobs is not None:
        diff = torch.where(valid, ref_logprobs.detach().to(dtype) - logp, zero)
        kl = torch.exp(diff) - diff - 1  # per_token_kl, inlined to keep the masked-diff guard
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        if cfg.beta != 0.0:
            loss = loss + cfg.beta * kl
        kl_sum = torch.where(valid, kl.detach(), zero).sum(-1)
    if exact_kl is not None:
        kl = torch.where(valid, exact_kl.to(dtype), zero)
        loss = loss + cfg.beta * kl
        kl_sum = kl.detach().sum(-1)
    loss = torch.where(valid, loss, zero)

    with torch.no_grad():
        m = valid.to(dtype)
        low = (ratio < 1 - eps_low) & (adv < 0) & valid
        high = (ratio > 1 + eps_high) & (adv > 0) & valid
        stats = GRPOStats(
            tokens=m.sum(-1),
            low_clipped=low.to(dtype).sum(-1),
            high_clipped=high.to(dtype).sum(-1),
            region_clipped=(low | high).to(dtype).sum(-1),
            kl=kl_sum,
        )
    return loss, stats


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    weights: Tensor | None = None,
) -> tuple[Tensor, GRPOStats]:
    """The scalar GRPO loss ``(per_token_objective * weights).sum()``, equal to TRL 1.16's for ``cfg.loss_type``.

    For segment-wise backward, compute ``w = token_weights(full_mask, ...)`` once and call this per column chunk
    ``c`` with ``weights=w[:, c]`` and the chunk's inputs; the chunk losses (and stats, with ``+``) sum to the full
    batch's.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (differentiable).
        old_logprobs: ``[B, T]`` sampling-time log-probs.
        ref_logprobs: ``[B, T]`` reference log-probs, or ``None`` (allowed only with ``cfg.beta == 0``).
        advantages: ``[B]`` per-sequence advantages.
        mask: ``[B, T]`` completion mask for these columns.
        cfg: Loss settings.
        weights: ``[B, T]`` token weights for these columns; default ``token_weights(mask, ...)`` (whole batch).

    Returns:
        (scalar loss, detached stats).
    """
    if weights is None:
        weights = token_weights(mask, cfg.loss_type, cfg.max_completion_length)
    if weights.shape != mask.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} must equal mask shape {tuple(mask.shape)}")
    per_token, stats = per_token_objective(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg)
    return (per_token * weights.to(per_token.dtype)).sum(), stats
