"""Sections of training: the training loop with its objectives (``sft``, ``distill``, ``grpo``) and their rollouts,
the warm start.

Part of the configuration that ``pte.config`` assembles (docs/pipeline.md, "Configuration"); no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from pte.config.engine import SamplingConfig
from pte.config.methods import METHODS
from pte.config.schema import check_range, fail, section_from_dict

__all__ = ["LOSS_TYPES", "DistillConfig", "GRPOConfig", "RolloutConfig", "SFTConfig", "TrainConfig",
           "WarmstartConfig", "check_loss_settings", "eviction_weight", "learning_rate", "recall_weight"]


LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo")
"""``train.grpo.loss_type`` values, with TRL's meaning (see :class:`GRPOConfig`)."""


def check_loss_settings(loss_type: str, epsilon: float, epsilon_high: float | None, beta: float,
                        delta: float | None = None) -> None:
    """The one validation of the GRPO loss settings, shared by :class:`GRPOConfig` (the ``train.grpo`` section) and
    ``pte.training.grpo.GRPOLossConfig`` (the loss's view of it, built by ``GRPOLossConfig.from_config``).

    Raises:
        ValueError: naming the ``train.grpo.<key>``, the value and what is allowed.
    """
    if loss_type not in LOSS_TYPES:
        fail("train.grpo.loss_type", loss_type, f"one of {list(LOSS_TYPES)}")
    check_range("train.grpo.epsilon", epsilon, 0.0, 1.0, hi_open=True)
    check_range("train.grpo.epsilon_high", epsilon_high, 0.0)
    if not math.isfinite(beta):
        fail("train.grpo.beta", beta, "a finite number >= 0 (0 disables the KL term)")
    check_range("train.grpo.beta", beta, 0.0)
    upper = epsilon if epsilon_high is None else epsilon_high
    if delta is not None and delta <= 1.0 + upper:
        fail("train.grpo.delta", delta, f"a number > 1 + epsilon_high = {1.0 + upper:g}, or None")


@dataclass(frozen=True)
class RolloutConfig:
    """``train.rollout``: sampling the rollouts that ``grpo`` and on-policy ``distill`` train on (names follow TRL's
    ``GRPOConfig``), and the check of their replay."""

    num_generations: int = 8
    """G: completions sampled per prompt (one group)."""
    max_completion_length: int = 256
    """Generated tokens per completion at most."""
    temperature: float = 1.0
    """Rollout sampling temperature (log-probs are of softmax(logits / temperature))."""
    top_p: float = 1.0
    """Rollout nucleus sampling mass."""
    top_k: int = 0
    """Rollout top-k (0 = off)."""
    batch: int = 16
    """Rows generated together (a multiple of ``train.micro_batch``)."""
    check_replay: bool = True
    """At every rollout step, check replay log-probs against rollout log-probs and stop, naming the worst token, if
    they differ by more than ``replay_tolerance`` (the gaps cost nothing extra: the replay computes them anyway)."""
    replay_tolerance: float = 1e-3
    """Largest allowed change of a sampled token's probability, ``|exp(replay) - exp(rollout)|``, on the checked step
    in fp32 (docs/method.md, "Replay check"). A probability moves by at most ``p`` times its log-prob, so the float
    noise of an unlikely sampled token (a log-prob gap up to 6e-4 measured on an AVX-512 CPU) stays far below it,
    while every injected replay fault moved some token's probability by 2.6e-2 or more at the demo's shapes."""
    replay_tolerance_bf16: float = 0.1
    """The same bound in bf16, used automatically when the run's precision is bf16. bf16 logits carry a rounding of
    up to 2^-9 of their magnitude, so two exact but differently batched forwards (a one-token decode step and a
    replay chunk) already differ by a measurable amount: on CPU, max |replay - rollout| log-prob over 192 sampled
    tokens was up to 0.39 on SmolLM2-135M-Instruct (``docs/method.md``, "Precision")."""

    def __post_init__(self) -> None:
        check_range("train.rollout.num_generations", self.num_generations, 2)
        check_range("train.rollout.max_completion_length", self.max_completion_length, 1)
        check_range("train.rollout.temperature", self.temperature, 0.0, lo_open=True)
        check_range("train.rollout.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("train.rollout.top_k", self.top_k, 0)
        check_range("train.rollout.batch", self.batch, 1)
        check_range("train.rollout.replay_tolerance", self.replay_tolerance, 0.0)
        check_range("train.rollout.replay_tolerance_bf16", self.replay_tolerance_bf16, 0.0)

    def sampling(self) -> SamplingConfig:
        """The rollout's sampling settings."""
        return SamplingConfig(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


@dataclass(frozen=True)
class GRPOConfig:
    """``train.grpo``: the reward and the loss of the ``grpo`` objective (docs/method.md, "Loss and training"); names
    follow TRL's ``GRPOConfig``."""

    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Loss aggregation with TRL's meaning: per-sequence mean (grpo), token mean (dapo), fixed length (dr_grpo, whose
    constant is ``train.rollout.max_completion_length``)."""
    epsilon: float = 0.2
    """PPO clip range (lower), in [0, 1)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher); null = epsilon."""
    delta: float | None = None
    """Upper clamp of the unclipped ratio (TRL's ``delta``, INTELLECT-2's two-sided clipping), > 1 + epsilon_high;
    null = off."""
    beta: float = 0.001
    """k3 KL coefficient against the reference (the base model, adapters off)."""
    kl_cache: Literal["full", "bounded"] = "full"
    """Cache of the reference forward: full (the paper's Eq. 3) or the same bounded cache as the policy."""
    kl_estimator: Literal["k3", "exact"] = "k3"
    """``k3``: the one-sample estimate from the sampled token's log-probs (TRL, verl, the paper); ``exact``: the
    per-position KL over the whole vocabulary against the full-cache reference, chunk by chunk (what the ``distill``
    objective optimises; needs ``kl_cache: full``)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: group std (population std, as the paper), batch std, or none (Dr. GRPO)."""
    use_bias_correction_kl: bool = False
    """TRL's bias-corrected KL (multiplies the k3 term by the ratio); off = plain k3 as in verl and the paper."""
    reward: Literal["math", "char_match"] = "math"
    """``math``: the answer oracle of pte.data.rewards (``data.allow_last_number``); ``char_match``: dense toy reward
    for smoke tests."""

    def __post_init__(self) -> None:
        check_loss_settings(self.loss_type, self.epsilon, self.epsilon_high, self.beta, self.delta)
        if self.kl_estimator == "exact" and self.kl_cache != "full":
            raise ValueError("params: `train.grpo.kl_estimator` = 'exact' needs `train.grpo.kl_cache` = 'full' (the "
                             f"teacher is the full-cache reference), got {self.kl_cache!r}; set kl_cache: full or "
                             "kl_estimator: k3.")


@dataclass(frozen=True)
class SFTConfig:
    """``train.sft``: the token weights of the ``sft`` objective; all at their defaults, it is the plain NLL."""

    eviction_weight: float = 0.0
    """alpha of eviction-weighted ``sft`` (not the paper): each reference token weighs ``1 + alpha * max(0, d)`` in the
    loss, with ``d`` the frozen base's eviction sensitivity at that token (its NLL under the training cache minus
    under a full cache, adapters off): near 0 where the window suffices, large where an evicted thought is needed. A
    signal every task has, the task-agnostic form of ``recall_weight``; 0 = off."""
    eviction_steps: int | None = None
    """Steps, from the first, that use ``eviction_weight``; later steps are the plain NLL. None = every step."""
    eviction_threshold: float | None = None
    """None: the extra weight is proportional, ``alpha * max(0, d)``. A number tau (nats): a selection instead, each
    token with ``d > tau`` weighs ``1 + alpha`` and every other token 1, so the few tokens that need an evicted
    thought weigh alike however much the base's full cache helped them (research/log.md, "Twelfth study
    session")."""
    recall_weight: float = 1.0
    """Weight of a recall token (a value a worked solution recalls from an early variable,
    ``pte.data.tasks.recall_spans``) in the loss, a weighted token mean; every other token weighs 1, so 1 is the plain
    NLL. An oracle label only the synthetic ``var_chain`` task has: a research setting for comparison
    (research/log.md), set in no preset. A solution holds one recall token among about 100, and a large weight
    isolates the signal that only a memory of evicted thoughts can fit."""
    recall_steps: int | None = None
    """Steps, from the first, whose loss weighs recall tokens by ``recall_weight``; later steps weigh them by
    ``recall_weight_after`` (1 = the plain NLL). None = every step. A two-phase recipe (research/log.md, "Sixth study
    session"): the weighted phase teaches the state to carry the evicted value, the second phase repairs the other
    tokens that the weight traded away."""
    recall_weight_after: float = 1.0
    """Weight of a recall token after the first ``recall_steps`` steps. 1 makes the second phase the plain NLL, which
    can erase part of what the weighted phase taught; 10 kept the recall but left the other tokens unrepaired
    (research/log.md, "Eighth study session")."""

    def __post_init__(self) -> None:
        check_range("train.sft.eviction_weight", self.eviction_weight, 0.0)
        check_range("train.sft.eviction_steps", self.eviction_steps, 0)
        check_range("train.sft.eviction_threshold", self.eviction_threshold, 0.0)
        check_range("train.sft.recall_weight", self.recall_weight, 0.0)
        check_range("train.sft.recall_steps", self.recall_steps, 0)
        check_range("train.sft.recall_weight_after", self.recall_weight_after, 0.0)


@dataclass(frozen=True)
class DistillConfig:
    """``train.distill``: the ``distill`` objective. Either way the teacher is the adapter-disabled, full-cache model,
    so the signal is task-agnostic: the per-token divergence is near zero where the window suffices and large where
    an evicted thought is needed."""

    source: Literal["rollouts", "solutions"] = "rollouts"
    """The tokens the student matches the teacher on: ``rollouts``, sampled by the student under its bounded cache
    (on-policy, ``train.rollout`` settings); ``solutions``, the rows' worked solutions teacher-forced under the
    training cache (off-policy: no rollout; ``train.prompts_per_step`` rows a step, as ``sft``)."""
    beta: float = 1.0
    """Generalized-JSD interpolation: 1 = KL(student || teacher) (the KL of Eq. 3), 0 = KL(teacher || student), in
    between = the JSD of GKD."""
    nll_weight: float = 0.0
    """``source: solutions`` only: weight of the solutions' plain NLL (the ``sft`` loss) added to the divergence;
    0 = divergence alone."""

    def __post_init__(self) -> None:
        check_range("train.distill.beta", self.beta, 0.0, 1.0)
        check_range("train.distill.nll_weight", self.nll_weight, 0.0)
        if self.nll_weight and self.source != "solutions":
            raise ValueError(f"params: `train.distill.nll_weight` = {self.nll_weight} needs `train.distill.source: "
                             "solutions` (on rollouts there is no reference token); set it or remove the key.")


OBJECTIVE_SECTIONS: dict[str, tuple[str, ...]] = {"grpo": ("rollout", "grpo"), "sft": ("sft",), "distill": ("distill",)}
"""The ``train`` subsections each objective reads (``distill`` reads ``rollout`` too when its source is rollouts);
a preset omits the others."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop and its DeepSpeed engine (docs/method.md, "Loss and training"), with one subsection per
    objective (``sft``, ``distill``, ``grpo``) and the rollout settings ``grpo`` and on-policy ``distill`` share
    (``rollout``)."""

    methods: tuple[str, ...] = ("lora", "lora_c", "pte")
    """Methods the pipeline trains (one ``train@<method>`` DVC stage each); ``pte train --method`` picks one."""
    objective: Literal["grpo", "sft", "distill"] = "grpo"
    """What the replay optimises (docs/method.md, "Objectives"): ``grpo`` (the paper's Eq. 3); ``sft``, teacher-forced
    NLL of worked solutions under the method's training cache (``prompts_per_step`` rows a step; the rows' source
    must have a worked-solution writer); ``distill``, distillation toward the model's own adapter-disabled,
    full-cache distribution (TRL's generalized JSD over the whole vocabulary), on the student's rollouts or on worked
    solutions."""
    steps: int = 20
    """Optimizer steps."""
    prompts_per_step: int = 2
    """Prompts per step (across all processes); with rollouts each yields a group of ``rollout.num_generations``."""
    micro_batch: int = 8
    """Rows replayed and backpropagated together."""
    lr: float = 1e-5
    """AdamW learning rate (the peak of ``lr_schedule``)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``constant``: ``lr`` at every step; ``cosine``: ``lr`` decayed along a half cosine to 0 after ``steps``, over
    the last ``lr_decay_steps`` steps (:func:`learning_rate`; a function of the step alone, so a resumed run continues
    it)."""
    lr_decay_steps: int | None = None
    """``cosine`` only: the steps the decay spans, at the end of the run; ``lr`` is constant before them (a
    warmup-stable-decay schedule without warm-up, ``transformers.get_wsd_schedule``). None = every step (plain
    cosine)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train."""
    save_every: int = 10
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed)."""
    init_adapter: str | None = None
    """An adapter directory (``models/<method>/adapter`` of an earlier run, same method) to start from instead of a
    fresh adapter, e.g. GRPO after ``sft`` or ``distill``."""
    gradient_checkpointing: bool = False
    """Recompute in backward, in full-cache replays (``lora``), the decoder layers (HF activation checkpointing) and
    the LM head + log-softmax (256 positions at a time): activation memory of one layer and one head chunk instead
    of all, for ~1/3 more compute. Bounded-cache methods replay one segment at a time already and ignore it. Needed
    for long full-cache rollouts (the paper preset's ``lora``)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollouts of ``grpo`` and of ``distill`` on ``rollouts``."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The ``grpo`` objective's reward and loss."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """The ``sft`` objective's token weights."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The ``distill`` objective."""

    def teacher_forced(self) -> bool:
        """True when a step replays worked solutions instead of rollouts: ``sft``, or ``distill`` on ``solutions``."""
        return self.objective == "sft" or (self.objective == "distill" and self.distill.source == "solutions")

    def read_sections(self) -> tuple[str, ...]:
        """The subsections this objective reads; the others change nothing and a params file omits them."""
        return OBJECTIVE_SECTIONS[self.objective] + (() if self.teacher_forced() or self.objective == "grpo"
                                                     else ("rollout",))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, section: str) -> TrainConfig:
        """Parse the ``train`` section; a subsection the objective does not read is a warning naming it (it would
        change nothing but the run's hash)."""
        cfg = section_from_dict(cls, data, section)
        ignored = sorted(set(data or {}) & set(SUBSECTIONS) - set(cfg.read_sections()))
        if ignored:
            warnings.warn(f"params: `{section}.{ignored[0]}` is set but `{section}.objective` = {cfg.objective!r} "
                          f"reads only {[f'{section}.{s}' for s in cfg.read_sections()]}; remove "
                          f"{[f'{section}.{s}' for s in ignored]}.", UserWarning, stacklevel=2)
        return cfg

    def __post_init__(self) -> None:
        trainable = [m for m in METHODS if m != "base"]
        if not self.methods or any(m not in trainable for m in self.methods) or len(set(self.methods)) != len(
                self.methods):
            fail("train.methods", list(self.methods), f"a non-empty list of distinct names from {trainable}")
        check_range("train.steps", self.steps, 1)
        check_range("train.prompts_per_step", self.prompts_per_step, 1)
        check_range("train.micro_batch", self.micro_batch, 1)
        check_range("train.lr", self.lr, 0.0, lo_open=True)
        check_range("train.weight_decay", self.weight_decay, 0.0)
        check_range("train.grad_clip", self.grad_clip, 0.0)
        check_range("train.zero_stage", self.zero_stage, 0, 3)
        check_range("train.save_every", self.save_every, 1)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        if self.lr_decay_steps is not None:
            if self.lr_schedule != "cosine":
                raise ValueError(f"params: `train.lr_decay_steps` = {self.lr_decay_steps} needs `train.lr_schedule: "
                                 f"cosine` (it is {self.lr_schedule!r}); set the schedule or remove the key.")
            check_range("train.lr_decay_steps", self.lr_decay_steps, 1, self.steps)
        if self.rollout.batch % self.micro_batch:
            raise ValueError(f"params: `train.rollout.batch` = {self.rollout.batch} is not a multiple of "
                             f"`train.micro_batch` = {self.micro_batch}; make it one.")


SUBSECTIONS = ("rollout", "grpo", "sft", "distill")
"""The nested sections of ``train``."""


@dataclass(frozen=True)
class WarmstartConfig:
    """The ``warmstart`` stage: supervised fine-tuning of the base on worked solutions of ``data.warmstart`` before
    GRPO, so that a small base already reasons in the task's format. Full fine-tuning with TRL's ``SFTTrainer``, loss
    on the completion only (docs/method.md, "Data and warm start")."""

    enabled: bool = False
    """Run the stage; when false, later stages use the base model as it is."""
    epochs: float = 1.0
    """Passes over the warm-start problems."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    batch_size: int = 8
    """Examples per optimizer step."""
    warmup: float = 0.1
    """Fraction of the steps spent warming the learning rate up (then cosine decay to zero)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 512
    """Longest prompt + solution in tokens; longer examples are truncated."""

    def __post_init__(self) -> None:
        check_range("warmstart.epochs", self.epochs, 0.0, lo_open=True)
        check_range("warmstart.lr", self.lr, 0.0, lo_open=True)
        check_range("warmstart.batch_size", self.batch_size, 1)
        check_range("warmstart.warmup", self.warmup, 0.0, 1.0, hi_open=True)
        check_range("warmstart.weight_decay", self.weight_decay, 0.0)
        check_range("warmstart.max_length", self.max_length, 2)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The AdamW learning rate of optimizer step ``step`` (0-based) under ``train.lr_schedule``: ``lr`` (constant), or
    (cosine) ``lr`` until the last ``n = lr_decay_steps`` steps (all by default), then ``lr`` times the half cosine
    ``(1 + cos(pi * k / n)) / 2`` at their k-th: the curve of ``transformers``' warmup-stable-decay schedule without
    warm-up, 0 after the last step."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    n = cfg.lr_decay_steps or cfg.steps
    k = min(max(step - (cfg.steps - n), 0), n)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * k / n))


def eviction_weight(cfg: TrainConfig, step: int) -> float:
    """The ``sft`` eviction weight alpha at optimizer step ``step``: ``sft.eviction_weight`` for the first
    ``sft.eviction_steps`` steps (all of them when None), then 0."""
    sft = cfg.sft
    if cfg.objective != "sft" or (sft.eviction_steps is not None and step >= sft.eviction_steps):
        return 0.0
    return sft.eviction_weight


def recall_weight(cfg: TrainConfig, step: int) -> float:
    """The ``sft`` weight of a recall token at optimizer step ``step``: ``sft.recall_weight`` for the first
    ``sft.recall_steps`` steps (all of them when None), then ``sft.recall_weight_after``."""
    sft = cfg.sft
    if sft.recall_steps is not None and step >= sft.recall_steps:
        return sft.recall_weight_after
    return sft.recall_weight
