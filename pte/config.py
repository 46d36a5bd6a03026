"""Typed, frozen configuration: one dataclass per concern, loaded from ``params.yaml``.

``load_params`` is the only YAML reader in the package. Every section of the file maps to one
dataclass with the same field names; unknown sections or keys and values of the wrong type or out of
range raise ``ValueError`` naming the key, the value and what is allowed. Derived quantities are
methods, never extra YAML keys.

This module knows nothing about models, tensors or the pipeline stages that consume it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the data section's schema lives with the data sources (pte.data), which import this module
    from pte.data import DataConfig

__all__ = [
    "AdapterConfig",
    "BaseConfig",
    "CacheConfig",
    "EvalConfig",
    "GRPOConfig",
    "ModelConfig",
    "Params",
    "PTEConfig",
    "RegistryConfig",
    "SamplingConfig",
    "TrackingConfig",
    "TrainConfig",
    "WarmstartConfig",
    "load_params",
    "params_from_dict",
]


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"params: `{key}` = {value!r} is invalid; allowed: {allowed}.")


def _check_range(key: str, value: float | int | None, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    if value is None:
        return
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        _fail(key, value, f"a number in {left}{lo_s}, {hi_s}{right}")


@dataclass(frozen=True)
class BaseConfig:
    """Settings shared by every stage."""

    seed: int = 0
    """The one seed of a run; every generator is derived from it."""


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how."""

    source: str = "random:llama-tiny"
    """HF hub id, local HF directory, a ``.gguf`` file, ``pkg://<package>/<file>.gguf`` (a file shipped in an
    installed package, located without importing it), or ``random:<preset>`` (random weights from a built-in
    architecture, for tests and memory benchmarks)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights and activations dtype; ``auto`` = bfloat16 on CUDA, float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel of the HF model."""
    revision: str | None = None
    """Pinned revision for hub models (ignored for local sources)."""


@dataclass(frozen=True)
class CacheConfig:
    """The bounded KV cache (DESIGN 3.1): a prompt block plus a thinking window with chunked eviction.

    Set at most one of ``window`` and ``budget``; with neither, the cache is full (no eviction).
    """

    window: int | Literal["auto"] | None = "auto"
    """Thinking-window slots W. ``auto`` = the padded prompt length of the micro-batch (the paper's
    training setting); ``null`` = full cache (unless ``budget`` is set)."""
    budget: int | None = None
    """Total slots P + W (the paper's evaluation "cache size"); W = budget - P per batch."""
    evict_ratio: float = 0.25
    """Fraction of the window evicted at once when it overflows: ceil(evict_ratio * W) tokens."""

    def __post_init__(self) -> None:
        if isinstance(self.window, int) and self.window < 1:
            _fail("cache.window", self.window, "an integer >= 1, 'auto', or null for a full cache")
        if self.budget is not None and self.budget < 2:
            _fail("cache.budget", self.budget, "an integer >= 2 (prompt + at least one thinking slot), or null")
        _check_range("cache.evict_ratio", self.evict_ratio, 0.0, 1.0, lo_open=True)
        if self.budget is not None and self.window is not None:
            raise ValueError(
                f"params: `cache.window` = {self.window!r} and `cache.budget` = {self.budget!r} are both set; "
                "set one of them and the other to null.")

    @property
    def is_full(self) -> bool:
        """True when nothing is ever evicted."""
        return self.window is None and self.budget is None

    def thinking_window(self, prompt_len: int) -> int | None:
        """Thinking slots W for a batch whose padded prompt block has ``prompt_len`` tokens (None = unbounded)."""
        if self.budget is not None:
            w = self.budget - prompt_len
            if w < 1:
                raise ValueError(
                    f"cache.budget = {self.budget} leaves no room for thinking tokens after a prompt block of "
                    f"{prompt_len} tokens; raise the budget above {prompt_len} or shorten the prompts.")
            return w
        if self.window == "auto":
            return max(1, prompt_len)
        return self.window

    def evict_count(self, window: int) -> int:
        """Tokens evicted per event for a thinking window of ``window`` slots."""
        return max(1, min(window, math.ceil(self.evict_ratio * window - 1e-9)))


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter shape shared by LoRA baselines and PTE, so the comparison is fair (DESIGN 3.4)."""

    rank: int = 32
    """r: LoRA rank, and the latent rank of the PTE state."""
    alpha: float = 32.0
    """Scaling numerator; the adapter output is multiplied by alpha / rank."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers (by attribute name) that receive the adapter."""
    dropout: float = 0.0
    """LoRA dropout (peft baselines only)."""

    def __post_init__(self) -> None:
        _check_range("adapter.rank", self.rank, 1)
        _check_range("adapter.alpha", self.alpha, 0.0, lo_open=True)
        _check_range("adapter.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not self.target_modules:
            _fail("adapter.target_modules", self.target_modules, "a non-empty list of linear layer names")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PTEConfig:
    """Thought-state encoder settings (DESIGN 3.3)."""

    global_tokens: int = 32
    """G: number of learnable global tokens (rows of the state S)."""
    per_layer_globals: bool = False
    """One set of global tokens per decoder layer instead of one shared set."""
    normalize: Literal["accumulate", "recursive"] = "accumulate"
    """``accumulate``: S = Norm(S_g + sum of event states) (Fig. 2); ``recursive``: S <- Norm(S + S'_e) (the text)."""
    event_updates: bool = True
    """False = the Global-Only ablation: S stays Norm(S_g), evictions never update it."""
    use_global_state: bool = True
    """False = the #Global-0 ablation: the S_g term is dropped (S starts at 0)."""
    eps: float = 1e-6
    """Epsilon of the row-wise L2 normalisation."""

    def __post_init__(self) -> None:
        _check_range("pte.global_tokens", self.global_tokens, 1)
        _check_range("pte.eps", self.eps, 0.0, lo_open=True)


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings for rollouts, evaluation and ``pte generate``."""

    max_new_tokens: int = 256
    """Generated tokens per sequence at most."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""

    def __post_init__(self) -> None:
        _check_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        _check_range("sampling.temperature", self.temperature, 0.0)
        _check_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("sampling.top_k", self.top_k, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GRPOConfig:
    """Group rollouts, reward and loss (DESIGN 3.7); names follow TRL's ``GRPOConfig``."""

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
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Loss aggregation with TRL's meaning: per-sequence mean (grpo), token mean (dapo), fixed length (dr_grpo)."""
    epsilon: float = 0.2
    """PPO clip range (lower)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher); null = epsilon."""
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
    """``math``: the answer oracle of pte.rewards; ``char_match``: dense toy reward for smoke tests."""
    allow_last_number: bool = False
    """Accept the last number of a completion as its answer when it has no \\boxed{} / Answer: line."""

    def __post_init__(self) -> None:
        _check_range("grpo.num_generations", self.num_generations, 2)
        _check_range("grpo.max_completion_length", self.max_completion_length, 1)
        _check_range("grpo.temperature", self.temperature, 0.0, lo_open=True)
        _check_range("grpo.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("grpo.top_k", self.top_k, 0)
        _check_range("grpo.epsilon", self.epsilon, 0.0, 1.0)
        _check_range("grpo.epsilon_high", self.epsilon_high, 0.0)
        _check_range("grpo.beta", self.beta, 0.0)
        if self.kl_estimator == "exact" and self.kl_cache != "full":
            raise ValueError("params: `grpo.kl_estimator` = 'exact' needs `grpo.kl_cache` = 'full' (the teacher is the "
                             f"full-cache reference), got {self.kl_cache!r}; set kl_cache: full or kl_estimator: k3.")

    def sampling(self) -> SamplingConfig:
        """The rollout's sampling settings."""
        return SamplingConfig(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop and its DeepSpeed engine (DESIGN 3.9)."""

    methods: tuple[str, ...] = ("lora", "lora_c", "pte")
    """Methods the pipeline trains (one ``train@<method>`` DVC stage each); ``pte train --method`` picks one."""
    steps: int = 20
    """Optimizer steps."""
    prompts_per_step: int = 2
    """Prompts per step (across all processes); each yields a group of num_generations rollouts."""
    rollout_batch: int = 16
    """Rows generated together (a multiple of micro_batch)."""
    micro_batch: int = 8
    """Rows replayed and backpropagated together."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
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
    check_replay: bool = True
    """On the first step, check replay log-probs against rollout log-probs and stop if they differ."""
    replay_tolerance: float = 1e-4
    """Largest allowed |replay - rollout| log-prob difference for the check in fp32 (``train.precision: fp32``)."""
    replay_tolerance_bf16: float = 1.0
    """The same bound in bf16, used automatically when the run's precision is bf16. bf16 logits carry a rounding of
    up to 2^-9 of their magnitude, so two exact but differently batched forwards (a one-token decode step and a
    replay chunk) already differ by a measurable amount: on CPU, max |replay - rollout| over 192 sampled tokens was
    up to 0.39 on SmolLM2-135M-Instruct and 0.016 on the tiny random models (``docs/method.md``, "Precision"). A
    replay that feeds the wrong context or state is off by whole nats; this bound keeps that apart from rounding."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    objective: Literal["grpo", "sft", "distill"] = "grpo"
    """What the replay optimises (docs/method.md, "Objectives"): ``grpo`` (the paper's Eq. 3); ``sft``, teacher-forced
    NLL of worked solutions under the method's training cache (``prompts_per_step`` rows a step; the rows' source
    must have a worked-solution writer); ``distill``, on-policy distillation of the sampled rollouts toward the
    model's own adapter-disabled, full-cache distribution (TRL's generalized JSD over the whole vocabulary)."""
    distill_beta: float = 1.0
    """Generalized-JSD interpolation of ``distill``: 1 = KL(student || teacher) (the KL of Eq. 3), 0 =
    KL(teacher || student), in between = the JSD of GKD."""
    init_adapter: str | None = None
    """An adapter directory (``models/<method>/adapter`` of an earlier run, same method) to start from instead of a
    fresh adapter, e.g. GRPO after ``sft`` or ``distill``."""
    gradient_checkpointing: bool = False
    """Recompute in backward, in full-cache replays (``lora``), the decoder layers (HF activation checkpointing) and
    the LM head + log-softmax (256 positions at a time): activation memory of one layer and one head chunk instead
    of all, for ~1/3 more compute. Bounded-cache methods replay one segment at a time already and ignore it. Needed
    for long full-cache rollouts (the paper preset's ``lora``)."""

    def __post_init__(self) -> None:
        _check_range("train.steps", self.steps, 1)
        _check_range("train.prompts_per_step", self.prompts_per_step, 1)
        _check_range("train.rollout_batch", self.rollout_batch, 1)
        _check_range("train.micro_batch", self.micro_batch, 1)
        _check_range("train.lr", self.lr, 0.0, lo_open=True)
        _check_range("train.weight_decay", self.weight_decay, 0.0)
        _check_range("train.grad_clip", self.grad_clip, 0.0)
        _check_range("train.zero_stage", self.zero_stage, 0, 3)
        _check_range("train.save_every", self.save_every, 1)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        _check_range("train.threads", self.threads, 0)
        _check_range("train.distill_beta", self.distill_beta, 0.0, 1.0)
        _check_range("train.replay_tolerance", self.replay_tolerance, 0.0)
        _check_range("train.replay_tolerance_bf16", self.replay_tolerance_bf16, 0.0)
        if self.rollout_batch % self.micro_batch:
            raise ValueError(f"params: `train.rollout_batch` = {self.rollout_batch} is not a multiple of "
                             f"`train.micro_batch` = {self.micro_batch}; make it one.")


@dataclass(frozen=True)
class WarmstartConfig:
    """The ``warmstart`` stage (DESIGN 5): supervised fine-tuning of the base on worked solutions of
    ``data.warmstart`` before GRPO, so that a small base already reasons in the task's format. Full fine-tuning
    with TRL's ``SFTTrainer``, loss on the completion only."""

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
    threads: int = 0
    """torch CPU threads (0 = torch's default). The model is bit-identical only for the same thread count."""

    def __post_init__(self) -> None:
        _check_range("warmstart.epochs", self.epochs, 0.0, lo_open=True)
        _check_range("warmstart.lr", self.lr, 0.0, lo_open=True)
        _check_range("warmstart.batch_size", self.batch_size, 1)
        _check_range("warmstart.warmup", self.warmup, 0.0, 1.0, hi_open=True)
        _check_range("warmstart.weight_decay", self.weight_decay, 0.0)
        _check_range("warmstart.max_length", self.max_length, 2)
        _check_range("warmstart.threads", self.threads, 0)


EVAL_METHODS = ("base", "lora", "lora_c", "pte", "pte_global_only", "pte_no_global")
"""= ``pte.adapters.METHODS`` (a test keeps them equal); importing adapters here would pull torch into the config."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of every method under every cache budget (DESIGN 3.8; paper §3 protocol, §6 q11).

    The seed is ``base.seed``; each generation batch draws from a generator derived from (seed, budget, batch).
    """

    methods: tuple[str, ...] = ("base", "lora", "lora_c", "pte")
    """Methods to evaluate (names of ``pte.adapters.METHODS``); ``base`` is the model without an adapter."""
    budgets: tuple[int | None, ...] = (None, 192, 128)
    """Total cache slots C = prompt block P + thinking window W (W = C - P per batch); null = full cache."""
    num_samples: int = 4
    """n: samples per problem; accuracy is pass@1 averaged over them (the paper: 5)."""
    pass_k: tuple[int, ...] = (1, 4)
    """k values of the unbiased pass@k estimator; each k <= num_samples."""
    temperature: float = 0.6
    """Sampling temperature (0 = greedy: the n samples are then identical)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    max_new_tokens: int = 256
    """Generated tokens per sample at most; samples cut here count as truncated."""
    evict_ratio: float = 0.25
    """Fraction of the thinking window evicted per event, the same for every method."""
    batch_size: int = 16
    """Rows generated together; a batch holds max(1, batch_size // num_samples) whole problems."""
    max_problems: int | None = None
    """Evaluate only the first N problems (null = all)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over problems) for the accuracy confidence interval; 0 = no interval."""
    ci: float = 0.95
    """Confidence level of the interval."""
    allow_last_number: bool = False
    """Accept the last number of a completion as its answer when it has no \\boxed{} / Answer: line."""
    long_response_tokens: int | None = None
    """Length from which a response counts as long in the length histogram (null = ceil(0.2 * max_new_tokens),
    about the paper's 600 of 3096 in Fig. 6)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in EVAL_METHODS]
        if not self.methods or bad or len(set(self.methods)) != len(self.methods):
            _fail("evaluate.methods", list(self.methods),
                  f"a non-empty list of distinct names from {list(EVAL_METHODS)}")
        if not self.budgets or len(set(self.budgets)) != len(self.budgets):
            _fail("evaluate.budgets", list(self.budgets), "a non-empty list of distinct integers >= 2 or null (full)")
        for b in self.budgets:
            if b is not None and b < 2:
                _fail("evaluate.budgets", list(self.budgets), "integers >= 2 (prompt + one thinking slot) or null")
        _check_range("evaluate.num_samples", self.num_samples, 1)
        if not self.pass_k or any(k < 1 or k > self.num_samples for k in self.pass_k):
            _fail("evaluate.pass_k", list(self.pass_k),
                  f"a non-empty list of integers in [1, num_samples = {self.num_samples}]; raise num_samples for "
                  "larger k")
        _check_range("evaluate.temperature", self.temperature, 0.0)
        _check_range("evaluate.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("evaluate.top_k", self.top_k, 0)
        _check_range("evaluate.max_new_tokens", self.max_new_tokens, 1)
        _check_range("evaluate.evict_ratio", self.evict_ratio, 0.0, 1.0, lo_open=True)
        _check_range("evaluate.batch_size", self.batch_size, 1)
        _check_range("evaluate.max_problems", self.max_problems, 1)
        _check_range("evaluate.bootstrap", self.bootstrap, 0)
        _check_range("evaluate.ci", self.ci, 0.0, 1.0, lo_open=True, hi_open=True)
        _check_range("evaluate.long_response_tokens", self.long_response_tokens, 1)

    def sampling(self) -> SamplingConfig:
        """The evaluation's decoding settings."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k)

    def cache(self, budget: int | None) -> CacheConfig:
        """The cache of one budget: C total slots with sliding-window eviction, or the full cache for None."""
        return CacheConfig(window=None, budget=budget, evict_ratio=self.evict_ratio)

    def long_threshold(self) -> int:
        """Tokens from which a response counts as long."""
        if self.long_response_tokens is not None:
            return self.long_response_tokens
        return max(1, math.ceil(0.2 * self.max_new_tokens))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking (DESIGN 1, 4): where runs go. Metrics also always go to a local JSON-lines file."""

    tracking_uri: str | None = None
    """MLflow tracking URI (``http://host:5000``, ``sqlite:////abs/mlflow.db``); null = the ``MLFLOW_TRACKING_URI``
    environment variable when set, else ``sqlite:///mlflow.db`` in the working directory."""
    artifact_location: str = "mlartifacts"
    """Artifact root of a newly created experiment: a directory (relative = to the working directory) used with a
    local tracking store, or a URI (``s3://...``, ``mlflow-artifacts:/...``) used as is. A remote (http) server
    ignores a plain directory and uses its own artifact root."""
    experiment: str = "pte"
    """Experiment name (created on first use)."""
    enabled: bool = True
    """Log runs to MLflow; false = only the local JSON-lines metrics."""

    def __post_init__(self) -> None:
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            _fail("tracking.tracking_uri", self.tracking_uri,
                  "a URI such as http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db, or null for the default")
        if not self.experiment.strip():
            _fail("tracking.experiment", self.experiment, "a non-empty experiment name, e.g. pte")
        if not self.artifact_location.strip():
            _fail("tracking.artifact_location", self.artifact_location, "a directory or a URI, e.g. mlartifacts")

    def resolved_uri(self, cwd: str | Path | None = None) -> str:
        """The tracking URI in use: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an absolute
        ``sqlite:///<cwd>/mlflow.db``."""
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if env:
            return env
        return "sqlite:///" + str(Path(cwd or Path.cwd()).resolve() / "mlflow.db")

    def resolved_artifact_location(self, uri: str, cwd: str | Path | None = None) -> str | None:
        """Artifact root for a new experiment under tracking URI ``uri``: a URI as is; a directory as an absolute
        ``file://`` URI for a local store; None (the server's default) for a remote server."""
        loc = self.artifact_location
        if "://" in loc or loc.startswith("mlflow-artifacts:"):
            return loc
        if uri.split(":", 1)[0].lower() in ("http", "https", "databricks"):
            return None
        return (Path(cwd or Path.cwd()) / loc).resolve().as_uri()


def _model_slug(source: str) -> str:
    """``Qwen/Qwen2.5-3B-Instruct`` -> ``qwen2.5-3b-instruct``; ``pkg://p/SmolLM2-135M.gguf`` -> ``smollm2-135m``."""
    name = source.rstrip("/")
    if name.startswith("random:"):
        name = "random-" + name[len("random:"):]
    name = name.rsplit("/", 1)[-1]
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")
    return slug or "model"


@dataclass(frozen=True)
class RegistryConfig:
    """MLflow Model Registry (DESIGN 4): the name a trained policy is registered under and when it becomes
    ``champion`` (only when it beats the current champion on ``metric`` at ``budget``; else ``challenger``)."""

    model_name: str | None = None
    """Registered model name; null = ``pte-<slug of the base model>``, e.g. ``pte-qwen2.5-3b-instruct``."""
    metric: str = "accuracy"
    """Evaluation metric compared between versions: a key of the evaluate stage's per-budget metrics."""
    budget: int | str = "min"
    """Which cache budget's metric: ``min`` = the tightest evaluated budget, ``full`` = the full cache, or a total
    budget C (an integer, also accepted as a string)."""
    greater_is_better: bool = True
    """True: a higher metric wins (accuracy, pass@k); false: a lower one wins."""
    include_base_model: bool = True
    """Copy a local base-model directory into the registered model (self-contained, loads offline); false = store
    only the base model's source string (hub id, ``pkg://...``) and load it from there."""

    def __post_init__(self) -> None:
        if self.model_name is not None and (not self.model_name.strip() or any(c in self.model_name for c in "/:")):
            _fail("registry.model_name", self.model_name, "a non-empty name without '/' or ':', or null for pte-<base>")
        if not self.metric.strip():
            _fail("registry.metric", self.metric, "a metric name of the evaluation, e.g. accuracy")
        self.budget_key()

    def budget_key(self) -> str:
        """``"min"``, ``"full"`` or the budget C as a decimal string."""
        b = self.budget
        if isinstance(b, str) and b.strip().lower() in ("min", "full"):
            return b.strip().lower()
        if isinstance(b, str) and b.strip().isdigit():
            b = int(b.strip())
        if isinstance(b, int) and not isinstance(b, bool) and b >= 2:
            return str(b)
        _fail("registry.budget", self.budget, "'min' (tightest evaluated budget), 'full', or an integer >= 2")
        raise AssertionError  # unreachable: _fail raises

    def resolved_model_name(self, base_source: str) -> str:
        """``model_name``, or ``pte-<slug>`` of the base model's source string."""
        return self.model_name or f"pte-{_model_slug(base_source)}"


@dataclass(frozen=True)
class Params:
    """All sections of ``params.yaml``."""

    base: BaseConfig = field(default_factory=BaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    pte: PTEConfig = field(default_factory=PTEConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: _data_config_cls()())
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __post_init__(self) -> None:
        if self.warmstart.enabled and not self.data.warmstart:
            raise ValueError("params: `warmstart.enabled` is true but `data.warmstart` lists no source; add one, e.g. "
                             "{name: var_chain, size: 256, seed: 7}, or set warmstart.enabled: false.")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (tuples become lists), for logging and checkpoints."""
        return _plain(dataclasses.asdict(self))


def _data_config_cls() -> type:
    from pte.data import DataConfig

    return DataConfig


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp``, or ``_NO`` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        return value if value in typing.get_args(tp) and not isinstance(value, bool) else _NO
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO
        (item_tp, _ellipsis) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    raise TypeError(f"unsupported config field type {tp!r}")


def section_from_dict(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``data`` of section ``section``, validating every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(section, data, f"a mapping with keys {[f.name for f in dataclasses.fields(cls)]}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"params: unknown key `{section}.{key}`; known keys of `{section}`: {sorted(names)}.")
    kwargs = {}
    for key, value in data.items():
        out = _coerce(value, hints[key])
        if out is _NO:
            _fail(f"{section}.{key}", value, _type_name(hints[key]))
        kwargs[key] = out
    return cls(**kwargs)


def params_from_dict(data: dict[str, Any] | None) -> Params:
    """Validate a parsed ``params.yaml`` mapping and build ``Params``."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"params: the top level must be a mapping of sections, got {type(data).__name__}.")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params, localns={"DataConfig": _data_config_cls()})
    for name in data:
        if name not in sections:
            raise ValueError(f"params: unknown section `{name}`; known sections: {sorted(sections)}.")
    built = {}
    for name in data:
        cls = hints[name]
        parse = getattr(cls, "from_dict", None)  # sections with nested schemas parse themselves
        built[name] = parse(data[name], name) if parse else section_from_dict(cls, data[name], name)
    return Params(**built)


def load_params(path: str | Path) -> Params:
    """Read and validate a params YAML file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown section or key, or a value of the wrong type or range (the message names it).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {str(path)!r} not found; pass --params PATH to an existing YAML file.")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ValueError(f"params file {str(path)!r} is not valid YAML: {exc}") from exc
    return params_from_dict(data)
