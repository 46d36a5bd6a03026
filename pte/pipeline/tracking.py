"""Experiment tracking behind a narrow seam: a JSON-lines log always, MLflow when configured.

The training loop talks to a :class:`Tracker` and never branches on whether tracking is on
(``NullTracker`` is the null object). Every metric also lands in a local JSON-lines file, so an
unreachable tracking server never loses a run: :func:`make_tracker` probes the server with a short
socket timeout and falls back to the JSON-lines file alone, and :class:`MlflowTracker` switches itself
off (with one warning) after the first MLflow error instead of raising into training.

:func:`sync_run` replays such a file (its params, tags and per-step metrics) into MLflow once the server is back
(``pte tracking sync <run dir>``, ``docs/pipeline.md``); replaying it again logs nothing.

This module and ``pte.pipeline.registry`` are the only ones that import mlflow (lazily here, so that training
without MLflow never pays the import). It knows nothing about models, training or the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pte.config import TrackingConfig

__all__ = [
    "JsonlTracker",
    "MlflowTracker",
    "MultiTracker",
    "NullTracker",
    "Tracker",
    "clean_metrics",
    "configure_http",
    "ensure_experiment",
    "flatten_params",
    "make_tracker",
    "read_metrics",
    "read_run",
    "require_reachable",
    "run_context",
    "sync_run",
    "unreachable_reason",
]

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # mlflow's MAX_PARAM_VAL_LENGTH
MAX_TAG_CHARS = 8000  # mlflow's MAX_TAG_VAL_LENGTH
_BATCH = 100  # mlflow's MAX_PARAMS_TAGS_PER_BATCH (metrics allow 1000; one limit keeps it simple)
_METRIC_BATCH = 1000  # mlflow's MAX_METRICS_PER_BATCH, for replaying a whole run
SYNC_TAG = "pte.sync_id"  # the tag that makes `pte tracking sync` idempotent
# Without these, one call to a dead server retries 7 times with exponential backoff and stalls a step for minutes.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class Tracker:
    """Interface: parameters once, metrics per step, tags, and close (the model files go to MLflow through the
    registry, ``pte.pipeline.registry``)."""

    def log_params(self, params: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:  # pragma: no cover - interface
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def close(self) -> None:  # pragma: no cover - interface
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class NullTracker(Tracker):
    """Tracks nothing (non-zero ranks, tests)."""


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


class JsonlTracker(Tracker):
    """Appends ``{"step": s, **metrics}`` lines to a file (resumed runs append; readers keep the last per step).

    Params and tags go to the same file as ``{"params": {...}}`` / ``{"tags": {...}}`` lines (no ``step``), so that the
    file alone describes the run and :func:`sync_run` can replay it into MLflow later.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._append({"params": params})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append({"tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append({"step": step, **{k: _finite(v) for k, v in metrics.items()}})


class MultiTracker(Tracker):
    """Fans out to several trackers."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def close(self) -> None:
        for t in self.trackers:
            t.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        for t in self.trackers:
            t.__exit__(exc_type, exc, tb)


def read_run(path: str | Path) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    """``(params, tags, rows)`` of a :class:`JsonlTracker` file: params and tags merged in order (later lines win),
    rows one per step (the last line written for a step wins: resumes rewrite). A missing file is an empty run.

    Raises:
        ValueError: a line is not a JSON object with ``step``, ``params`` or ``tags`` (names the file and line).
    """
    params: dict[str, Any] = {}
    tags: dict[str, str] = {}
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    lines = path.read_text().splitlines() if path.is_file() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg}); fix or delete that line") from exc
        if isinstance(row, dict) and "step" in row:
            by_step[int(row["step"])] = row
        elif isinstance(row, dict) and isinstance(row.get("params"), dict):
            params.update(row["params"])
        elif isinstance(row, dict) and isinstance(row.get("tags"), dict):
            tags.update(row["tags"])
        else:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'step', 'params' or 'tags'; got {line[:80]!r}")
    return params, tags, [by_step[s] for s in sorted(by_step)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics JSON-lines file, one per step (the last line written for a step wins: resumes rewrite)."""
    return read_run(path)[2]


# -- helpers shared with pte.pipeline.registry
# -----------------------------------------------------------------------------


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with MLflow-safe string values.

    Lists, tuples and other non-scalars become JSON; every value is cut to MLflow's 6000-character limit.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        if isinstance(value, str):
            text = value
        elif value is None or isinstance(value, (bool, int, float)):
            text = str(value)
        else:
            text = json.dumps(value, default=str, sort_keys=True)
        out[name] = text[:MAX_PARAM_CHARS]
    return out


def _metric_name(name: str) -> str:
    # mlflow accepts only [/\w.\- :]; anything else (e.g. "pass@4") would reject the whole batch
    safe = "".join(c if c.isalnum() or c in "/_.- :" else "_" for c in str(name))
    return safe.strip("/") or "_"


def environment_tags(env: dict[str, Any] | None = None) -> dict[str, str]:
    """The numeric environment (:func:`pte.pipeline.numerics.environment`) as MLflow tags ``numerics.<a.b>``."""
    from pte.pipeline.numerics import environment

    return flatten_params({"numerics": environment() if env is None else env})


def _mlflow_params(params: dict[str, Any]) -> dict[str, str]:
    """Flattened (``a.b``), stringified, truncated params whose keys follow MLflow's key rules (those of metrics)."""
    return {_metric_name(k)[:250]: v for k, v in flatten_params(params).items()}


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numeric metrics with MLflow-safe names; None, NaN, inf and non-numbers are dropped."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[_metric_name(k)] = float(v)
    return out


def run_context(root: str | Path | None = None) -> dict[str, str | None]:
    """``{"git_sha": HEAD or "unknown", "dvc_lock_sha256": hash of dvc.lock or None}`` for run and model tags."""
    root = Path(root or Path.cwd())
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        sha = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    lock = root / "dvc.lock"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
    return {"git_sha": sha, "dvc_lock_sha256": digest}


def _context_tags(root: str | Path | None = None) -> dict[str, str]:
    ctx = run_context(root)
    tags = {"git_sha": ctx["git_sha"] or "unknown", "mlflow.source.git.commit": ctx["git_sha"] or "unknown"}
    if ctx["dvc_lock_sha256"]:
        tags["dvc_lock_sha256"] = ctx["dvc_lock_sha256"]
    return tags


def require_reachable(uri: str, consequence: str, retry: str,
                      where: str = "tracking.tracking_uri / MLFLOW_TRACKING_URI") -> None:
    """Raise a ``ConnectionError`` saying ``consequence`` and how to ``retry`` when the server at ``uri`` is down
    (a fast probe, no MLflow retries); otherwise configure MLflow's HTTP timeouts for it."""
    reason = unreachable_reason(uri)
    if reason is not None:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({reason}); {consequence}. Start the "
                              f"server (or point {where} at a running one) and {retry}.")
    configure_http(uri)


def configure_http(uri: str) -> None:
    """For an http(s) tracking URI, cap MLflow's retries and timeout (unless the environment already sets them)."""
    if uri.split(":", 1)[0].lower() in ("http", "https"):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)


def unreachable_reason(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking store behind ``uri`` can be reached, else why not (a short, human-readable reason).

    http(s) servers get a TCP connect with ``timeout`` seconds (no MLflow retries, so it fails in about that time);
    for a ``sqlite:///`` store the database's directory is created; other schemes are trusted.
    """
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        parsed = urlparse(uri)
        if not parsed.hostname:
            return f"no host in {uri!r}"
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                return None
        except OSError as exc:
            return f"cannot connect to {parsed.hostname}:{port}: {exc}"
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        try:
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the database directory: {exc}"
    return None


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created with ``artifact_location`` when missing (an existing one keeps its own)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or set "
                             "tracking.experiment to another name.")
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# -- MLflow -------------------------------------------------------------------------------------------------------


class MlflowTracker(Tracker):
    """Logs one MLflow run through ``MlflowClient`` (no global mlflow state).

    After :meth:`start`, any MLflow error in a logging call logs one warning and turns this tracker off for the rest
    of the run: training never crashes because of tracking (pair it with a :class:`JsonlTracker`).
    """

    def __init__(self, tracking_uri: str, experiment: str = "pte", artifact_location: str | None = None):
        from mlflow import MlflowClient

        configure_http(tracking_uri)
        self.tracking_uri, self.experiment, self.artifact_location = tracking_uri, experiment, artifact_location
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id: str | None = None
        self.active = False
        self._params: dict[str, str] = {}

    def start(self, run_name: str | None = None, tags: dict[str, Any] | None = None,
              run_id: str | None = None) -> str:
        """Create (or, with ``run_id``, continue) the run; tags get the git SHA and the ``dvc.lock`` hash.

        Raises:
            Exception: whatever MLflow raises (unreachable or broken store); :func:`make_tracker` catches it.
        """
        all_tags = {**_context_tags(), **{k: str(v)[:MAX_TAG_CHARS] for k, v in (tags or {}).items()}}
        if run_id is None:
            exp_id = ensure_experiment(self.client, self.experiment, self.artifact_location)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._batch(tags=all_tags)
        self.run_id, self.active = run_id, True
        return run_id

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # any tracking failure must not end training
            self.active = False
            log.warning("MLflow %s failed for run %s at %s (%s: %s); MLflow logging is off for the rest of this run, "
                        "metrics still go to the local JSON-lines file.", what, self.run_id, self.tracking_uri,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def _batch(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None,
               tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        items = ([Metric(k, v, ts, step) for k, v in (metrics or {}).items()]
                 + [Param(k, v) for k, v in (params or {}).items()] + [RunTag(k, v) for k, v in (tags or {}).items()])
        for i in range(0, len(items), _BATCH):
            chunk = items[i : i + _BATCH]
            self.client.log_batch(self.run_id, metrics=[x for x in chunk if isinstance(x, Metric)],
                                  params=[x for x in chunk if isinstance(x, Param)],
                                  tags=[x for x in chunk if isinstance(x, RunTag)])

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened (``a.b``), stringified, truncated; a key already logged with another value is skipped (MLflow
        params are immutable) with a warning."""
        flat = _mlflow_params(params)
        changed = sorted(k for k, v in flat.items() if k in self._params and self._params[k] != v)
        if changed:
            log.warning("MLflow params are immutable; not re-logging changed keys %s of run %s", changed[:5],
                        self.run_id)
        new = {k: v for k, v in flat.items() if k not in self._params}
        if new and self.active:
            self._guard("log_params", self._batch, params=new)
            self._params.update(new)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        items = clean_metrics(metrics)
        if items:
            self._guard("log_metrics", self._batch, metrics=items, step=int(step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._guard("set_tags", self._batch, tags={k: str(v)[:MAX_TAG_CHARS] for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self.active:
            self._guard("close", self.client.set_terminated, self.run_id, status)
            self.active = False

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status)


def make_tracker(cfg: TrackingConfig, run_name: str, out_dir: str | Path | None = None,
                 tags: dict[str, Any] | None = None) -> Tracker:
    """The tracker of one run: JSON-lines metrics in ``out_dir/metrics.jsonl`` plus MLflow when enabled and reachable.

    An unreachable or failing tracking store is never fatal: it logs a warning and returns the JSON-lines tracker
    alone (within a few seconds: a 3 s connect probe, then MLflow's capped retries).

    Args:
        cfg: the ``tracking`` section.
        run_name: MLflow run name (e.g. ``train-pte``).
        out_dir: where ``metrics.jsonl`` goes; None = no local file (for callers that write their own, such as
            ``pte.training.train.Trainer``), in which case the fallback is a :class:`NullTracker`.
        tags: extra run tags (method, stage, ...).

    Returns:
        ``MultiTracker(JsonlTracker, MlflowTracker)``, or the local tracker alone.
    """
    local: Tracker = JsonlTracker(Path(out_dir) / "metrics.jsonl") if out_dir is not None else NullTracker()
    if not cfg.enabled:
        return local
    uri = cfg.resolved_uri()
    where = f"{Path(out_dir) / 'metrics.jsonl'}" if out_dir is not None else "the trainer's own metrics file"
    reason = unreachable_reason(uri)
    if reason is None:
        try:
            remote = MlflowTracker(uri, cfg.experiment, cfg.resolved_artifact_location(uri))
            remote.start(run_name, tags)
            return MultiTracker(local, remote)
        except Exception as exc:  # a broken tracking store must not stop training
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("MLflow tracking at %s is unavailable (%s); run %r logs metrics only to %s. Start the server or fix "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI (tracking.enabled: false silences this).",
                uri, reason, run_name, where)
    return local


# -- replaying an offline run ---------------------------------------------------------------------------------------


def _sync_id(params: dict[str, Any], tags: dict[str, str], rows: list[dict[str, Any]]) -> str:
    """A digest of what would be logged: the same run content (wherever its file lies) gets the same id."""
    blob = json.dumps({"params": params, "tags": tags, "rows": rows}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _runs_with_tag(client: Any, exp_id: str, key: str, value: str) -> list[Any]:
    return client.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'", max_results=50)


def _replay(client: Any, run_id: str, params: dict[str, str], rows: list[dict[str, Any]], stamp: int) -> None:
    from mlflow.entities import Metric, Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])
    metrics = [Metric(k, v, stamp, int(row["step"])) for row in rows
               for k, v in clean_metrics({k: v for k, v in row.items() if k != "step"}).items()]
    for i in range(0, len(metrics), _METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _METRIC_BATCH])


def sync_run(path: str | Path, cfg: TrackingConfig, run_name: str | None = None) -> dict[str, Any]:
    """Replay an offline run (a :class:`JsonlTracker` file) into MLflow, once.

    The MLflow run gets the file's params and tags, every step's metrics, and the tag ``pte.sync_id``: a digest of
    that content. A later call finds the finished run with the same digest in the experiment and logs nothing; a
    run left unfinished by an interrupted sync is deleted and replayed. A file that grew since (a resumed training) has
    another digest and becomes a new run.

    Args:
        path: a run directory holding ``metrics.jsonl`` (e.g. ``models/pte``), or the file itself.
        cfg: the ``tracking`` section (URI, experiment, artifact location); ``enabled`` is ignored.
        run_name: the MLflow run name (default: ``train-<method>`` from the params, else the directory name).

    Returns:
        ``{"run_id", "synced" (False when it already was), "steps", "sync_id", "tracking_uri", "experiment"}``.

    Raises:
        FileNotFoundError: no metrics file at ``path``.
        ValueError: the file holds no steps, or a malformed line.
        ConnectionError: the tracking server is unreachable (nothing was written).
    """
    from mlflow import MlflowClient

    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no metrics file at {str(file)!r}; pass a training output directory (e.g. "
                                "models/pte) or its metrics.jsonl.")
    params, tags, rows = read_run(file)
    if not rows:
        raise ValueError(f"{file} holds no per-step metrics; nothing to sync.")
    sync_id = _sync_id(params, tags, rows)
    uri = cfg.resolved_uri()
    require_reachable(uri, f"nothing was synced and {file} is intact", f"run `pte tracking sync {path}` again",
                      where="--tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, cfg.experiment, cfg.resolved_artifact_location(uri))
    result = {"sync_id": sync_id, "steps": len(rows), "tracking_uri": uri, "experiment": cfg.experiment}
    for run in _runs_with_tag(client, exp_id, SYNC_TAG, sync_id):
        if run.info.status == "FINISHED":
            return {**result, "run_id": run.info.run_id, "synced": False}
        client.delete_run(run.info.run_id)  # an interrupted sync: replay it whole rather than guess what is missing
    method = params.get("method")
    name = run_name or (f"train-{method}" if method else file.parent.resolve().name)
    all_tags = {**tags, **({"method": str(method), "stage": "train"} if method else {}), SYNC_TAG: sync_id,
                "pte.synced_from": str(file.resolve())[:MAX_TAG_CHARS]}
    run_id = client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    try:
        # every point gets the file's time: the steps were logged then, not now
        _replay(client, run_id, _mlflow_params(params), rows, int(file.stat().st_mtime * 1000))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("synced %d steps of %s into run %s at %s", len(rows), file, run_id, uri)
    return {**result, "run_id": run_id, "synced": True}
