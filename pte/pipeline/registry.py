"""Package a trained policy as an MLflow model version and promote it by champion / challenger aliases
(``docs/pipeline.md``, "The registered model").

* :class:`PTEPredictor`: a pyfunc model whose ``load_context`` rebuilds the policy (base model + adapter directory)
  and whose ``predict`` generates under the bounded KV cache (``docs/method.md``) through
  :class:`pte.engine.inference.Generator`, with the cache, sampling and prompt settings recorded in the model's
  ``model_config``: a bare problem is phrased as in training (``data.prompt_template``, ``data.system_prompt``).
* The model is logged from code (MLflow "models from code": the source file ``pte/pipeline/registry_model.py``, which
calls
  ``mlflow.models.set_model``), so the logged model holds no pickled Python object and loading it runs no unpickled
  code.
* :func:`register`: logs that model (base model copied in, or referenced by its source), registers a new version
  tagged with the compared metric, budget, method and git SHA, and moves ``champion`` to it only when it beats the
  current champion on ``registry.metric`` at ``registry.budget`` (else it gets ``challenger``).
* :func:`load_champion`: ``mlflow.pyfunc.load_model("models:/<name>@champion")``.

An unreachable tracking server raises :class:`ConnectionError` before anything is written. With
``pte.pipeline.tracking`` (and
the model file ``pte.pipeline.registry_model``), the only module importing mlflow. It knows nothing about training or
how evaluation computes its metrics.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pte.config import CacheConfig, RegistryConfig, SamplingConfig, TrackingConfig
from pte.data.rows import DataConfig, format_prompt
from pte.engine.adapters import read_adapter_meta
from pte.pipeline.tracking import clean_metrics, ensure_experiment, environment_tags, require_reachable, run_context

__all__ = ["CHALLENGER", "CHAMPION", "PTEPredictor", "load_champion", "package_policy", "register", "select_metric"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_NAME = "policy"  # the LoggedModel's name inside its run
OUTPUT_COLUMNS = ["text", "num_evictions", "max_cache_tokens", "finished"]
_MAX_VERSION_TAG = 100_000  # mlflow's MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH


class PTEPredictor(mlflow.pyfunc.PythonModel):
    """Generates under the bounded KV cache with the registered base model + adapter.

    ``model_config`` keys (override any at load time: ``mlflow.pyfunc.load_model(uri, model_config={...})``):
    ``window``, ``budget``, ``evict_ratio`` (cache; set one of window / budget, the other null), ``max_new_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``batch_size``, ``prompt_template`` (the training template
    text, with ``{problem}``), ``system_prompt`` (the training system message or null), ``raw`` (send inputs
    verbatim: no template, no system message, no chat template), ``dtype``, ``device`` (null = cuda when available),
    ``base_model_ref`` (source of a base model that was not copied in).
    """

    def load_context(self, context) -> None:
        import torch

        from pte.engine.inference import Generator

        cfg = dict(context.model_config or {})
        base = context.artifacts.get("base_model") or cfg.get("base_model_ref")
        device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = Generator.load(base, context.artifacts.get("adapter"), dtype=cfg.get("dtype", "float32"),
                                        device=device)
        self.cache = CacheConfig(window=cfg.get("window"), budget=cfg.get("budget"),
                                 evict_ratio=float(cfg.get("evict_ratio", 0.25)))
        self.sampling = SamplingConfig(max_new_tokens=int(cfg.get("max_new_tokens", 256)),
                                       temperature=float(cfg.get("temperature", 0.0)),
                                       top_p=float(cfg.get("top_p", 1.0)), top_k=int(cfg.get("top_k", 0)))
        self.seed, self.batch_size = int(cfg.get("seed", 0)), max(1, int(cfg.get("batch_size", 8)))
        self.raw = bool(cfg.get("raw", False))
        # versions registered before the prompt was recorded send their inputs as the user message, as they did
        self.data = DataConfig(prompt_template=cfg.get("prompt_template") or "{problem}",
                               system_prompt=cfg.get("system_prompt") or None)

    def build_prompts(self, problems: list[str], raw: bool = False) -> tuple[list[str], str | None]:
        """The user messages and system message of ``problems``, phrased as in training and evaluation.

        The training stage turns each problem into ``pte.data.rows.format_prompt(problem, data)`` and chat-templates it
        with ``pte.engine.inference.encode_prompts(..., system=data.system_prompt)``; this returns the same two inputs.

        Args:
            problems: bare problems (``raw=False``), or complete prompt texts (``raw=True``).
            raw: send the texts as they are: no template and no system message.

        Returns:
            ``(texts, system)``: one text per problem and the system message (None when raw or unset).
        """
        if raw:
            return list(problems), None
        return [format_prompt(p, self.data) for p in problems], self.data.system_prompt

    # The DataFrame hint (mlflow skips schema inference for it) stands for every accepted form, listed below.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Generate for every prompt.

        Args:
            context: the MLflow context (unused; everything is loaded in ``load_context``).
            model_input: bare problems, phrased with the recorded template and system message (see
                :meth:`build_prompts`): a DataFrame with a ``prompt`` column (or one column), a list of strings, a
                string, or a dict ``{"prompt": str | list[str]}``.
            params: ``{"seed": int}`` (batch ``i`` samples with ``seed + i * batch_size``), ``{"raw": bool}``
                (send the inputs verbatim, without template, system message or chat template).

        Returns:
            One row per prompt: ``text``, ``num_evictions``, ``max_cache_tokens`` (most KV slots held: prompt block +
            thinking window at most), ``finished`` (ended with EOS).
        """
        seed = int((params or {}).get("seed", self.seed))
        raw = bool((params or {}).get("raw", self.raw))
        prompts, system = self.build_prompts(_prompts(model_input), raw)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(prompts), self.batch_size):
            rows += self.generator(prompts[i : i + self.batch_size], self.cache, self.sampling, seed=seed + i,
                                   raw=raw, system=system)
        return pd.DataFrame([{k: r[k] for k in OUTPUT_COLUMNS} for r in rows], columns=OUTPUT_COLUMNS)


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        cols = list(model_input.columns)
        col = "prompt" if "prompt" in cols else cols[0] if len(cols) == 1 else None
        if col is None:
            raise ValueError(f"the input DataFrame needs a 'prompt' column; it has columns {cols}")
        values = model_input[col].tolist()
    elif isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise ValueError(f"the input dict needs a 'prompt' key; it has keys {sorted(model_input)}")
        values = model_input["prompt"]
    else:  # a Series / array, a list, or a single string
        values = model_input.tolist() if hasattr(model_input, "tolist") else model_input
    values = [values] if isinstance(values, str) else list(values)
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"prompts must be strings; got {sorted(set(bad))}")
    return values


def _leaves(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + tuple(str(k).split("/")))
    else:
        yield path, obj


def select_metric(eval_metrics: dict[str, Any], metric: str, budget: str = "min",
                  method: str = "pte") -> tuple[float, str]:
    """The compared value in the evaluate stage's ``metrics.json``: ``eval_metrics[method][budget][metric]``.

    Args:
        eval_metrics: ``{method: {budget_label: {metric: value}}}`` (budget labels ``"140"``, ``"full"``; other
            top-level keys such as ``summary`` are ignored).
        metric: the metric's key, e.g. ``accuracy`` or ``pass@4``.
        budget: ``min`` (the tightest budget with a finite value), ``full`` or a budget as a string.
        method: the registered method (``pte``, ``lora`` ...).

    Returns:
        ``(value, budget_label)``.

    Raises:
        ValueError: the method or metric is missing, or has no finite value at that budget (names what is there).
    """
    per_budget = eval_metrics.get(method)
    if not isinstance(per_budget, dict):
        raise ValueError(f"the evaluation metrics hold no method {method!r}; methods there: "
                         f"{sorted(k for k, v in eval_metrics.items() if isinstance(v, dict) and k != 'summary')}.")
    found = {label: float(m[metric]) for label, m in per_budget.items()
             if isinstance(m, dict) and isinstance(m.get(metric), (int, float)) and not isinstance(m[metric], bool)
             and math.isfinite(m[metric])}
    if not found:
        names = sorted({k for m in per_budget.values() if isinstance(m, dict) for k in m})
        raise ValueError(f"registry.metric = {metric!r}: no finite value for method {method!r} in the evaluation "
                         f"metrics; metric names there: {names[:20]}. Set registry.metric to one of them.")
    budgeted = sorted(found, key=lambda b: math.inf if b == "full" else int(b))
    pick = budgeted[0] if budget == "min" else budget
    if pick not in found:
        raise ValueError(f"registry.budget = {budget!r}: no {metric!r} at that budget; evaluated budgets with a value: "
                         f"{budgeted}. Set registry.budget to one of them or 'min'.")
    return found[pick], pick


def _requirements(gguf: bool) -> list[str]:
    # Explicit list: mlflow's inference would add torchvision for torch and fail when it is absent.
    # The pte package itself must be importable where the model is loaded (it holds PTEPredictor).
    names = ["mlflow", "torch", "transformers", "peft", "safetensors", "tokenizers", "pandas"]
    names += ["gguf"] if gguf else []
    reqs = []
    for n in names:
        try:
            reqs.append(f"{n}=={version(n).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(n)
    return reqs


def package_policy(adapter_dir: str | Path, base_model: str | Path, include_base: bool, cache: CacheConfig,
                   sampling: SamplingConfig, dtype: str = "float32", seed: int = 0,
                   base_source: str | None = None,
                   data: DataConfig | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The pyfunc ``(artifacts, model_config)`` of a policy.

    Args:
        adapter_dir: adapter directory (``pte_adapter.json`` + weights).
        base_model: a local HF directory (or ``.gguf`` file), or a source string (hub id, ``pkg://``, ``random:``).
        include_base: copy a local base model into the model's artifacts; else record only a reference.
        cache, sampling, dtype, seed: the predictor's settings (``model_config``; overridable at load time).
        base_source: the base model's original source (recorded for humans).
        data: the ``data`` section the policy was trained with; its template text and system prompt are recorded
            (default: :class:`~pte.data.rows.DataConfig`'s).

    Raises:
        FileNotFoundError: the adapter directory, or a local base directory without ``config.json``.
    """
    read_adapter_meta(adapter_dir)
    artifacts = {"adapter": str(Path(adapter_dir).resolve())}
    path = Path(str(base_model)).expanduser()
    ref: str | None = str(base_model)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model directory {str(path)!r} has no config.json; pass an HF model "
                                    "directory (as written by the base_model stage) or a model source string.")
        if include_base:
            artifacts["base_model"], ref = str(path.resolve()), None
        else:
            ref = str(path.resolve())
            log.warning("registering base model %s by its local path: the model version will only load where that "
                        "path exists (registry.include_base_model: true copies it in)", ref)
    config = {"base_model_ref": ref, "base_source": base_source or str(base_model), "window": cache.window,
              "budget": cache.budget, "evict_ratio": cache.evict_ratio, "max_new_tokens": sampling.max_new_tokens,
              "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": seed,
              "batch_size": 8, "raw": False, "dtype": dtype, "device": None,
              # the text, not the template's name: a later change of PROMPT_TEMPLATES must not rephrase this version
              "prompt_template": (data or DataConfig()).template, "system_prompt": (data or DataConfig()).system_prompt}
    return artifacts, config


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # No input schema on purpose: a schema would reject a plain list of prompts; _prompts validates instead.
    outputs = Schema([ColSpec("string", "text"), ColSpec("long", "num_evictions"),
                      ColSpec("long", "max_cache_tokens"), ColSpec("boolean", "finished")])
    return ModelSignature(inputs=None, outputs=outputs,
                          params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("raw", "boolean", False)]))


def model_code_path() -> str:
    """Path of the models-from-code file (``pte/pipeline/registry_model.py``) that :func:`register` logs as the
    model."""
    # Found, not imported (importing it would call set_model); the literal name lets the dvc.yaml dependency check
    # (tests/test_pipeline_config.py) see that the register stage runs this file.
    spec = importlib.util.find_spec("pte.pipeline.registry_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pte.pipeline.registry_model is missing from the installed pte package; reinstall pte.")
    return spec.origin


@contextlib.contextmanager
def _scoped_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API (log_model, register_model, models:/ URIs) at ``uri``, then restore the previous
    setting (mlflow's own helper would drop a user's MLFLOW_TRACKING_URI)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_RETRY_REGISTER = "retry with `dvc repro register` or `pte register --params params.yaml`"


def _by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _champion_value(champ, metric: str, label: str) -> float | None:
    """The champion's value of ``metric`` at budget ``label``: its tag, else looked up in its stored eval metrics."""
    tags = champ.tags or {}
    if tags.get("pte.metric_name") == metric and tags.get("pte.budget") == label and "pte.metric" in tags:
        return float(tags["pte.metric"])
    try:
        value, got = select_metric(json.loads(tags.get("pte.eval_metrics", "{}")), metric, label,
                                   tags.get("pte.method", "pte"))
    except (ValueError, json.JSONDecodeError):
        return None
    return value if got == label else None


def _promote(client: MlflowClient, name: str, ver: str, value: float, cfg: RegistryConfig,
             label: str) -> tuple[str, dict[str, Any] | None]:
    champ = _by_alias(client, name, CHAMPION)
    previous, wins = None, True
    if champ is not None:
        old = _champion_value(champ, cfg.metric, label)
        previous = {"version": str(champ.version), "metric": old}
        if old is None:
            log.warning("champion v%s of %s has no %s at budget %s to compare with; v%s becomes the challenger (move "
                        "the alias by hand if it should win)", champ.version, name, cfg.metric, label, ver)
            wins = False
        else:
            wins = value > old if cfg.greater_is_better else value < old
    alias = CHAMPION if wins else CHALLENGER
    client.set_registered_model_alias(name, alias, ver)
    client.set_model_version_tag(name, ver, "pte.alias_at_registration", alias)
    return alias, previous


def _log_policy(client: MlflowClient, tracking: TrackingConfig, uri: str, run_id: str | None, method: str,
                artifacts: dict[str, str], model_config: dict[str, Any], eval_metrics: dict[str, Any],
                tags: dict[str, str]) -> tuple[str, str]:
    """Log the pyfunc model in run ``run_id`` or a new ``register-<method>`` run; returns (model URI, run id)."""
    location = tracking.resolved_artifact_location(uri)
    exp_id = None if run_id else ensure_experiment(client, tracking.experiment, location)
    flat = {"eval/" + "/".join(p): v for p, v in _leaves(eval_metrics)}
    ref = str(model_config.get("base_model_ref") or "")
    name = None if run_id else f"register-{method}"
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=name) as run:
        mlflow.set_tags(tags)
        metrics = clean_metrics(flat)
        if metrics:
            mlflow.log_metrics(metrics)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*")
            # a path, not an instance: the model is logged from code and nothing is pickled
            info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=model_code_path(), artifacts=artifacts,
                                           model_config=model_config, signature=_signature(),
                                           pip_requirements=_requirements(ref.endswith(".gguf") or "pkg://" in ref))
    return info.model_uri, run.info.run_id


def _version_tags(value: float, label: str, cfg: RegistryConfig, method: str, source: str,
                  eval_metrics: dict[str, Any], form: str | None) -> dict[str, str]:
    ctx = run_context()
    evals = json.dumps(eval_metrics, default=str, sort_keys=True)
    tags = {"pte.metric": repr(value), "pte.metric_name": cfg.metric, "pte.budget": label, "pte.method": method,
            "pte.base_model": source, "pte.git_sha": ctx["git_sha"] or "unknown",
            "pte.greater_is_better": str(cfg.greater_is_better).lower(),
            "pte.eval_metrics": evals if len(evals) <= _MAX_VERSION_TAG else "{}"}  # lets a later version compare
    if form:  # a PTE adapter: the paper's form, or which extensions (docs/method.md, "Extensions")
        tags["pte.form"] = form
    if ctx["dvc_lock_sha256"]:
        tags["pte.dvc_lock_sha256"] = ctx["dvc_lock_sha256"]
    return tags


def register(adapter_dir: str | Path, base_model: str | Path, eval_metrics: dict[str, Any] | str | Path,
             cfg: RegistryConfig | None = None, tracking: TrackingConfig | None = None,
             cache: CacheConfig | None = None, sampling: SamplingConfig | None = None, run_id: str | None = None,
             base_source: str | None = None, dtype: str = "float32", seed: int = 0,
             data: DataConfig | None = None) -> dict[str, Any]:
    """Register a trained policy as a new model version; it becomes ``champion`` only if it beats the current one.

    Args:
        adapter_dir: the train stage's adapter directory.
        base_model: local HF directory of the base model (copied in when ``cfg.include_base_model``), or its source.
        eval_metrics: the evaluation's metrics (a mapping or a ``metrics.json`` path; see :func:`select_metric`).
        cfg: the ``registry`` section (name, compared metric and budget, direction).
        tracking: the ``tracking`` section (URI, experiment).
        cache, sampling, dtype, seed: the predictor's bounded cache, decoding, weights dtype and default seed.
        run_id: log the model into this existing run (e.g. the training run) instead of a new one.
        base_source: the base model's source string for the default name (default: the adapter's record).
        data: the ``data`` section of training; the model phrases bare problems with its template and system prompt.

    Returns:
        ``{name, version, alias, metric, budget, form, previous_champion, run_id, model_uri}``; ``form`` is the PTE
        form (None for other methods), ``previous_champion`` ``{version, metric}`` or None.

    Raises:
        ConnectionError: the tracking server is unreachable (nothing was written; retry later).
        FileNotFoundError: a missing adapter or base model directory.
        ValueError: the compared metric is not in ``eval_metrics``.
    """
    cfg, tracking = cfg or RegistryConfig(), tracking or TrackingConfig()
    sampling = sampling or SamplingConfig()
    if not isinstance(eval_metrics, dict):
        eval_metrics = json.loads(Path(eval_metrics).read_text())
    meta = read_adapter_meta(adapter_dir)
    method = str(meta.get("method", "unknown"))
    source = base_source or meta.get("base_model") or str(base_model)
    value, label = select_metric(eval_metrics, cfg.metric, cfg.budget_key(), method)
    name = cfg.resolved_model_name(source)
    artifacts, model_config = package_policy(adapter_dir, base_model, cfg.include_base_model, cache or CacheConfig(),
                                             sampling, dtype, seed, source, data)
    uri = tracking.resolved_uri()
    require_reachable(uri, "nothing was registered; the trained adapter and evaluation reports on disk are intact",
                      _RETRY_REGISTER)
    tags = _version_tags(value, label, cfg, method, source, eval_metrics, meta.get("form"))
    with _scoped_uri(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_tags = {"git_sha": tags["pte.git_sha"], "mlflow.source.git.commit": tags["pte.git_sha"],
                    "pte.method": method, "pte.registered_model": name, **environment_tags()}
        model_uri, run_id = _log_policy(client, tracking, uri, run_id, method, artifacts, model_config, eval_metrics,
                                        run_tags)
        ver = str(mlflow.register_model(model_uri, name, tags=tags).version)
        alias, previous = _promote(client, name, ver, value, cfg, label)
    log.info("registered %s v%s (%s = %s at budget %s) as %s", name, ver, cfg.metric, value, label, alias)
    return {"name": name, "version": ver, "alias": alias, "metric": value, "budget": label, "form": meta.get("form"),
            "previous_champion": previous, "run_id": run_id, "model_uri": f"models:/{name}/{ver}"}


def load_champion(name: str, tracking_uri: str | None = None, model_config: dict[str, Any] | None = None):
    """``mlflow.pyfunc.load_model("models:/<name>@champion")`` from ``tracking_uri`` (default: the ``tracking``
    defaults: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``); ``model_config`` overrides the predictor's settings.

    Raises:
        ConnectionError: the tracking server is unreachable.
    """
    uri = tracking_uri or TrackingConfig().resolved_uri()
    require_reachable(uri, f"cannot load {name}@{CHAMPION}", "retry")
    with _scoped_uri(uri):
        return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}", model_config=model_config)
