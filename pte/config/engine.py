"""Sections of the engine: the base model, the bounded KV cache, the adapters, the thought encoder, decoding.

Part of the configuration that ``pte.config`` assembles (docs/pipeline.md, "Configuration"); no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from pte.config.schema import check_range, fail

__all__ = ["AdapterConfig", "CacheConfig", "ModelConfig", "PTEConfig", "PTEExtensions", "SamplingConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how."""

    source: str = "random:llama-tiny"
    """HF hub id, local HF directory, a ``.gguf`` file, ``pkg://<package>/<file>.gguf`` (a file shipped in an
    installed package, located without importing it), or ``random:<preset>`` (random weights from a built-in
    architecture, for tests and memory benchmarks)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights and activations dtype of the base model (``pte.engine.models.resolve_dtype``; ``auto`` = bfloat16 on
    CUDA, float32 on CPU) in the base-model stage, the evaluation, the registered predictor and bf16 training. fp32
    training (``train.precision``) and the warm start (full fine-tuning, bf16 autocast on CUDA) keep fp32 weights."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel of the HF model."""
    revision: str | None = None
    """Pinned revision for hub models (ignored for local sources)."""


class _DefaultAuto(str):
    """The default ``"auto"`` of ``CacheConfig.window``: equal to ``"auto"`` but told apart by identity from an
    ``"auto"`` given explicitly, so that ``CacheConfig(budget=140)`` means the budget alone."""


_AUTO_WINDOW = _DefaultAuto("auto")


@dataclass(frozen=True)
class CacheConfig:
    """The bounded KV cache: a prompt block plus a thinking window with chunked eviction (docs/method.md, "Bounded
    cache").

    Set at most one of ``window`` and ``budget``; with neither, the cache is full (no eviction). ``window`` left at its
    default is ``auto`` without a budget and unset (None) with one: ``CacheConfig(budget=140)`` and ``cache: {budget:
    140}`` need no ``window: null``; a window given explicitly together with a budget is an error.
    """

    window: int | Literal["auto"] | None = _AUTO_WINDOW
    """Thinking-window slots W. ``auto`` (the default without ``budget``) = the padded prompt length of the
    micro-batch (the paper's training setting); ``null`` = full cache (unless ``budget`` is set)."""
    budget: int | None = None
    """Total slots P + W (the paper's evaluation "cache size"); W = budget - P per batch."""
    evict_ratio: float = 0.25
    """Fraction of the window evicted at once when it overflows: ceil(evict_ratio * W) tokens; the one eviction rule
    of training rollouts and of every evaluated budget."""
    compile_decode: bool = False
    """Run the one-token decode forward of a bounded cache through ``torch.compile`` (``mode="reduce-overhead"``,
    CUDA graphs, on a GPU; inductor's default on CPU), in training rollouts and in the evaluation of bounded budgets
    alike. Its shapes are static (``P + W`` slots written at a tensor index), so one compile serves every step
    of a batch shape. Off by default: on the 2-core CPU it measured no faster (docs/benchmarks.md), and each new batch
    shape compiles first (minutes on CPU)."""

    def __post_init__(self) -> None:
        if self.window is _AUTO_WINDOW:  # not given: auto, or unset when the budget decides the window
            object.__setattr__(self, "window", None if self.budget is not None else "auto")
        if isinstance(self.window, int) and self.window < 1:
            fail("cache.window", self.window, "an integer >= 1, 'auto', or null for a full cache")
        if self.budget is not None and self.budget < 2:
            fail("cache.budget", self.budget, "an integer >= 2 (prompt + at least one thinking slot), or null")
        check_range("cache.evict_ratio", self.evict_ratio, 0.0, 1.0, lo_open=True)
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

    def for_budget(self, budget: int | None) -> CacheConfig:
        """The cache of one evaluated budget: ``budget`` total slots (None = the full cache) under this cache's
        eviction rule and decode setting."""
        return CacheConfig(window=None, budget=budget, evict_ratio=self.evict_ratio,
                           compile_decode=self.compile_decode)

    def evict_count(self, window: int) -> int:
        """Tokens evicted per event for a thinking window of ``window`` slots."""
        return max(1, min(window, math.ceil(self.evict_ratio * window - 1e-9)))


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter shape shared by LoRA baselines and PTE, so the comparison is fair (docs/method.md, "Thought state and
    adapter")."""

    rank: int = 32
    """r: LoRA rank, and the latent rank of the PTE state."""
    alpha: float = 32.0
    """Scaling numerator; the adapter output is multiplied by alpha / rank."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers (by attribute name) that receive the adapter."""
    dropout: float = 0.0
    """LoRA dropout (peft baselines only)."""

    def __post_init__(self) -> None:
        check_range("adapter.rank", self.rank, 1)
        check_range("adapter.alpha", self.alpha, 0.0, lo_open=True)
        check_range("adapter.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not self.target_modules:
            fail("adapter.target_modules", self.target_modules, "a non-empty list of linear layer names")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PTEExtensions:
    """This project's settings beyond the paper (docs/method.md, "Extensions"): every field at its default is the
    paper's form, so an empty ``pte.extensions`` section is the paper."""

    write: Literal["linear", "softmax"] = "linear"
    """``linear``: the paper's event term, a sum over evicted tokens weighted by ``(q_g Wa_Q)(k_t Wa_K)^T``.
    ``softmax``: each global query pools the values of every token evicted so far with softmax weights over those
    scores (kept exactly across events by a running max and sum), so a score every token shares, such as the mean
    key, cannot swamp the token that matters (docs/method.md, "Softmax write")."""
    write_context: int = 1
    """The width c of a learned causal convolution over the evicted tokens' pre-RoPE keys and values before they are
    written (per layer and channel; the last c - 1 tokens of the previous event are carried over). 1 = the paper:
    each token is written alone, so a value can only be bound to what its own token carries; c > 1 lets a value's key
    and value come from tokens up to c - 1 apart, as a worked solution's value is identified by its line's variable a
    few tokens earlier (docs/method.md, "Context write"). Initialised to the identity, so a fresh adapter writes as the
    paper's does."""
    grad_horizon: int = 16
    """With a write that is not linear in its parameters (``write: softmax`` or ``write_context`` > 1): the replay
    recomputes the last ``grad_horizon`` events with gradient and folds older ones in detached (truncated
    backpropagation: the replay keeps that many events' K/V, a bounded cost). The paper's write folds every event
    exactly and does not read it."""

    def __post_init__(self) -> None:
        if self.write not in ("linear", "softmax"):
            raise ValueError(f"pte.extensions.write = {self.write!r} is unknown; allowed: linear (the paper), "
                             "softmax.")
        check_range("pte.extensions.write_context", self.write_context, 1)
        check_range("pte.extensions.grad_horizon", self.grad_horizon, 1)

    @property
    def exact(self) -> bool:
        """True when the write is linear in its parameters (the paper's): the replay folds every event exactly."""
        return self.write == "linear" and self.write_context == 1

    def names(self) -> tuple[str, ...]:
        """The extensions in use, as ``key=value`` (empty for the paper's form)."""
        if self.exact:
            return ()
        out = [f"write={self.write}"] if self.write != "linear" else []
        out += [f"write_context={self.write_context}"] if self.write_context > 1 else []
        return (*out, f"grad_horizon={self.grad_horizon}")


@dataclass(frozen=True)
class PTEConfig:
    """Thought-state encoder settings: the paper's keys, and this project's ``extensions`` apart (docs/method.md,
    "Thought state and adapter")."""

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
    extensions: PTEExtensions = dataclasses.field(default_factory=PTEExtensions)
    """Not the paper: the project's write forms (empty = the paper's form)."""

    def __post_init__(self) -> None:
        check_range("pte.global_tokens", self.global_tokens, 1)
        check_range("pte.eps", self.eps, 0.0, lo_open=True)
        if not self.extensions.exact and self.normalize == "recursive":
            raise ValueError(f"pte.extensions {list(self.extensions.names())} need pte.normalize: accumulate (the "
                             "replay recomputes recent events with gradient only in that form); set normalize: "
                             "accumulate or leave pte.extensions empty.")
        if not (self.event_updates or self.use_global_state):
            raise ValueError("pte.event_updates: false with pte.use_global_state: false leaves S = Normalize(0) = 0, "
                             "an adapter that adds nothing; keep one of them true.")

    def form(self) -> str:
        """Which PTE this is, as recorded in the adapter, the training metrics and the registry: ``paper``, or
        ``paper+`` the extensions in use (``paper+write=softmax,write_context=2,grad_horizon=16``)."""
        names = self.extensions.names()
        return "paper+" + ",".join(names) if names else "paper"

    def for_method(self, method: str) -> PTEConfig:
        """The settings a PTE ``method`` runs with: the ablations switch off event updates (``pte_global_only``) or
        the global state (``pte_no_global``) on top of these.

        Raises:
            ValueError: the method's ablation leaves an inert adapter under these settings (one line, with the fix).
        """
        if method == "pte_global_only":
            if not self.use_global_state:
                raise ValueError("method 'pte_global_only' with pte.use_global_state: false is an inert adapter "
                                 "(S = Normalize(0) = 0); set pte.use_global_state: true to run the Global-Only "
                                 "ablation.")
            return dataclasses.replace(self, event_updates=False)
        if method == "pte_no_global":
            return dataclasses.replace(self, use_global_state=False)
        return self


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings of one generation call; not a ``params.yaml`` section: rollouts decode with
    ``train.rollout.sampling()``, the evaluation and the registered predictor with ``evaluate.sampling()``, and
    ``pte generate`` with its command-line flags (docs/pipeline.md, "Configuration")."""

    max_new_tokens: int = 256
    """Generated tokens per sequence at most."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""

    def __post_init__(self) -> None:
        check_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        check_range("sampling.temperature", self.temperature, 0.0)
        check_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("sampling.top_k", self.top_k, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
