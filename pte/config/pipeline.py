"""Sections of the pipeline around training: evaluation, MLflow tracking, the model registry.

Part of the configuration that ``pte.config`` assembles (docs/pipeline.md, "Configuration"); no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pte.config.engine import SamplingConfig
from pte.config.methods import METHODS
from pte.config.schema import check_range, fail

__all__ = ["EvalConfig", "RegistryConfig", "TrackingConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of every method under every cache budget (docs/evaluation.md; paper §3 protocol).

    The seed is ``base.seed``; each generation batch draws from a generator derived from (seed, budget, batch).
    """

    methods: tuple[str, ...] = ("base", "lora", "lora_c", "pte")
    """Methods to evaluate (names of ``pte.config.methods.METHODS``); ``base`` is the model without an adapter."""
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
    batch_size: int = 16
    """Rows generated together; a batch holds max(1, batch_size // num_samples) whole problems."""
    max_problems: int | None = None
    """Evaluate only the first N problems (null = all)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over problems) for the accuracy confidence interval; 0 = no interval."""
    ci: float = 0.95
    """Confidence level of the interval."""
    long_response_tokens: int | None = None
    """Length from which a response counts as long in the length histogram (null = ceil(0.2 * max_new_tokens),
    about the paper's 600 of 3096 in Fig. 6)."""
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    """Per-dataset protocol: a ``data.eval`` source name -> its own ``num_samples`` and ``pass_k`` (the paper: pass@1
    over 5 samples on MATH-500, OlympiadBench, Minerva and AMC, pass@16 on AIME24/25). Empty = one protocol for all
    rows. With entries, every source is evaluated and reported on its own (``datasets`` in each budget's metrics) and
    a budget's ``accuracy`` is the mean over the sources, the paper's "Avg"."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad or len(set(self.methods)) != len(self.methods):
            fail("evaluate.methods", list(self.methods), f"a non-empty list of distinct names from {list(METHODS)}")
        if not self.budgets or len(set(self.budgets)) != len(self.budgets):
            fail("evaluate.budgets", list(self.budgets), "a non-empty list of distinct integers >= 2 or null (full)")
        for b in self.budgets:
            if b is not None and b < 2:
                fail("evaluate.budgets", list(self.budgets), "integers >= 2 (prompt + one thinking slot) or null")
        check_range("evaluate.num_samples", self.num_samples, 1)
        if not self.pass_k or any(k < 1 or k > self.num_samples for k in self.pass_k):
            fail("evaluate.pass_k", list(self.pass_k),
                  f"a non-empty list of integers in [1, num_samples = {self.num_samples}]; raise num_samples for "
                  "larger k")
        check_range("evaluate.temperature", self.temperature, 0.0)
        check_range("evaluate.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("evaluate.top_k", self.top_k, 0)
        check_range("evaluate.max_new_tokens", self.max_new_tokens, 1)
        check_range("evaluate.batch_size", self.batch_size, 1)
        check_range("evaluate.max_problems", self.max_problems, 1)
        check_range("evaluate.bootstrap", self.bootstrap, 0)
        check_range("evaluate.ci", self.ci, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("evaluate.long_response_tokens", self.long_response_tokens, 1)
        for source, override in self.protocols.items():
            if not isinstance(override, dict) or not override or set(override) - {"num_samples", "pass_k"}:
                fail(f"evaluate.protocols.{source}", override, "a mapping with num_samples and/or pass_k")
            self.for_source(source)  # validates the combination (each k <= num_samples)

    def for_source(self, source: str | None) -> EvalConfig:
        """The settings one ``data.eval`` source is evaluated with: these, with its ``protocols`` entry applied."""
        override = self.protocols.get(source) if source is not None else None
        if not override:
            return self
        try:
            return dataclasses.replace(self, protocols={}, num_samples=override.get("num_samples", self.num_samples),
                                       pass_k=tuple(override.get("pass_k", self.pass_k)))
        except ValueError as e:
            raise ValueError(f"params: `evaluate.protocols.{source}`: {e}") from None

    def sampling(self) -> SamplingConfig:
        """The evaluation's decoding settings."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k)

    def long_threshold(self) -> int:
        """Tokens from which a response counts as long."""
        if self.long_response_tokens is not None:
            return self.long_response_tokens
        return max(1, math.ceil(0.2 * self.max_new_tokens))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking: where runs go (docs/pipeline.md, "Training without the tracking server"). Metrics
    also always go to a local JSON-lines file."""

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
            fail("tracking.tracking_uri", self.tracking_uri,
                  "a URI such as http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db, or null for the default")
        if not self.experiment.strip():
            fail("tracking.experiment", self.experiment, "a non-empty experiment name, e.g. pte")
        if not self.artifact_location.strip():
            fail("tracking.artifact_location", self.artifact_location, "a directory or a URI, e.g. mlartifacts")

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
    """MLflow Model Registry (docs/pipeline.md, "The registered model"): the name a trained policy is registered
    under and when it becomes ``champion`` (only when it beats the current champion on ``metric`` at ``budget``;
    else ``challenger``)."""

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
            fail("registry.model_name", self.model_name, "a non-empty name without '/' or ':', or null for pte-<base>")
        if not self.metric.strip():
            fail("registry.metric", self.metric, "a metric name of the evaluation, e.g. accuracy")
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
        fail("registry.budget", self.budget, "'min' (tightest evaluated budget), 'full', or an integer >= 2")
        raise AssertionError  # unreachable: fail raises

    def resolved_model_name(self, base_source: str) -> str:
        """``model_name``, or ``pte-<slug>`` of the base model's source string."""
        return self.model_name or f"pte-{_model_slug(base_source)}"
