"""Experiment tracking behind a narrow seam: a JSON-lines log always, MLflow when configured.

The training loop talks to a :class:`Tracker` and never branches on whether tracking is on
(``NullTracker`` is the null object). Every metric also lands in a local JSON-lines file, so an
unreachable tracking server never loses a run. This is the only module that imports mlflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["JsonlTracker", "MultiTracker", "NullTracker", "Tracker", "read_metrics"]


class Tracker:
    """Interface: parameters once, metrics per step, artifacts (files), and close."""

    def log_params(self, params: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:  # pragma: no cover - interface
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # pragma: no cover
        pass

    def close(self) -> None:  # pragma: no cover - interface
        pass


class NullTracker(Tracker):
    """Tracks nothing (non-zero ranks, tests)."""


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


class JsonlTracker(Tracker):
    """Appends ``{"step": s, **metrics}`` lines to a file (resumed runs append; readers keep the last per step)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _finite(float(v)) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics JSON-lines file, one per step (the last line written for a step wins: resumes rewrite)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
