"""``pte verdict``: after a run, say whether it reproduced the committed results, and if not, why it may differ.

A bare ``git status`` after ``make run`` on another machine shows every trained output changed and cannot tell a
machine whose kernels round differently from a real change. The verdict compares the run with a git revision (the
committed lock, metrics and numeric environments) in three parts:

1. **outputs**: the stages of ``dvc.lock`` whose outputs' hashes differ;
2. **environment**: the keys of each stage's ``environment.json`` (``pte.pipeline.numerics.environment``) that differ;
3. **metrics**: each evaluation metric that has a committed bootstrap interval, inside or outside it.

and concludes: ``reproduced`` (the same outputs), ``consistent`` (different outputs, every metric inside its committed
interval) or ``changed`` (some metric outside). docs/reproducibility.md explains how to read it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pte.pipeline.tracking import flatten_params

__all__ = ["Verdict", "compare_environments", "compare_metrics", "compare_outputs", "judge", "verdict_at"]

METRICS = "reports/evaluate/metrics.json"
"""The metrics file whose values carry bootstrap intervals (``<key>`` with ``<key>_ci_low`` / ``<key>_ci_high``)."""


def _stage_outputs(lock: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``dvc.lock`` -> stage -> output path -> md5."""
    return {stage: {o["path"]: o.get("md5", "") for o in body.get("outs", [])}
            for stage, body in (lock or {}).get("stages", {}).items()}


def compare_outputs(committed: dict[str, Any], current: dict[str, Any]) -> dict[str, list[str]]:
    """Stages whose outputs differ between two parsed ``dvc.lock`` files: stage -> the differing output paths (a stage
    present in only one lock lists all its outputs)."""
    old, new = _stage_outputs(committed), _stage_outputs(current)
    out = {}
    for stage in sorted(set(old) | set(new)):
        a, b = old.get(stage, {}), new.get(stage, {})
        differ = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
        if differ:
            out[stage] = differ
    return out


def compare_environments(committed: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted) of two ``environment.json`` records that differ: key -> (committed, current)."""
    a, b = flatten_params(committed), flatten_params(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass(frozen=True)
class MetricCheck:
    """One metric of the current run against the committed value and its bootstrap interval."""

    key: str
    committed: float
    current: float | None
    low: float
    high: float

    @property
    def inside(self) -> bool:
        return self.current is not None and self.low <= self.current <= self.high


def compare_metrics(committed: dict[str, Any], current: dict[str, Any]) -> list[MetricCheck]:
    """Every metric of the committed evaluation summary that has an interval (``<key>_ci_low``, ``<key>_ci_high``),
    checked against the current summary (a metric missing from it is outside)."""
    checks = []
    for key in sorted(committed):
        low, high = committed.get(f"{key}_ci_low"), committed.get(f"{key}_ci_high")
        if low is None or high is None or key.endswith(("_ci_low", "_ci_high")):
            continue
        checks.append(MetricCheck(key, committed[key], current.get(key), low, high))
    return checks


@dataclass(frozen=True)
class Verdict:
    """The three comparisons and what they add up to."""

    outputs: dict[str, list[str]]
    environments: dict[str, dict[str, tuple[Any, Any]]]
    metrics: list[MetricCheck] = field(default_factory=list)

    @property
    def conclusion(self) -> str:
        if not self.outputs:
            return "reproduced"
        return "consistent" if all(m.inside for m in self.metrics) else "changed"

    def to_dict(self) -> dict[str, Any]:
        return {"conclusion": self.conclusion, "outputs": self.outputs,
                "environments": {f: {k: list(v) for k, v in d.items()} for f, d in self.environments.items()},
                "metrics": [{"key": m.key, "committed": m.committed, "current": m.current, "interval": [m.low, m.high],
                             "inside": m.inside} for m in self.metrics]}

    def report(self) -> str:
        """The verdict as text: a conclusion line, then the evidence."""
        lines = [f"verdict: {self.conclusion}"]
        same_env = not any(self.environments.values())
        if self.conclusion == "reproduced":
            lines.append("every stage's outputs have the committed hashes.")
        else:
            lines.append("stages whose outputs differ from the committed lock:")
            lines += [f"  {stage}: {', '.join(paths)}" for stage, paths in self.outputs.items()]
            if not self.environments:
                lines.append("the committed revision records no numeric environment (environment.json): whether this "
                             "machine's kernels differ from the lock's cannot be told.")
            elif same_env:
                lines.append("the numeric environment is the committed one: the difference comes from the code, the "
                             "data or the params, or from a source of nondeterminism that the pinning misses.")
            else:
                lines.append("the numeric environment differs from the committed one (docs/reproducibility.md):")
        # One line per difference, naming every record that shows it: another machine changes the same keys in
        # every stage's environment.json, and a line per file would bury the metrics below.
        where: dict[tuple[str, str, str], list[str]] = {}
        for name, diff in self.environments.items():
            for key, (old, new) in diff.items():
                where.setdefault((key, repr(old), repr(new)), []).append(name.removesuffix("/environment.json"))
        for (key, old, new), names in where.items():
            lines.append(f"  {key}: committed {old}, here {new} (in {', '.join(names)})")
        outside = [m for m in self.metrics if not m.inside]
        if self.metrics and self.conclusion != "reproduced":
            lines.append(f"metrics inside the committed 95% bootstrap interval: {len(self.metrics) - len(outside)} of "
                         f"{len(self.metrics)}")
            for m in outside:
                lines.append(f"  outside: {m.key} = {m.current} (committed {m.committed}, "
                             f"interval [{m.low}, {m.high}])")
        return "\n".join(lines)


def judge(committed_lock: dict, current_lock: dict, environments: dict[str, tuple[dict, dict]],
          committed_summary: dict, current_summary: dict) -> Verdict:
    """The verdict from parsed inputs: two locks, environment records by file (committed, current), two evaluation
    summaries. Pure."""
    envs = {name: compare_environments(old, new) for name, (old, new) in environments.items()}
    return Verdict(compare_outputs(committed_lock, current_lock), envs,
                   compare_metrics(committed_summary, current_summary))


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ValueError(f"verdict: `git {' '.join(args)}` failed in {root}: {detail.strip()}; run it in a clone of "
                         "the repository, with --ref naming a revision that holds dvc.lock.") from exc


def verdict_at(root: str | Path = ".", ref: str = "HEAD") -> Verdict:
    """Compare the working tree under ``root`` (after ``dvc repro``) with revision ``ref`` of its git repository."""
    root = Path(root)
    if not (root / "dvc.lock").is_file():
        raise FileNotFoundError(f"verdict: no dvc.lock in {root}; run `make run` (or `dvc repro`) first.")
    committed_lock = yaml.safe_load(_git(root, "show", f"{ref}:dvc.lock"))
    current_lock = yaml.safe_load((root / "dvc.lock").read_text())
    environments = {}
    for name in _git(root, "ls-tree", "-r", "--name-only", ref).split():
        if Path(name).name == "environment.json":
            here = root / name
            current = json.loads(here.read_text()) if here.is_file() else {}
            environments[name] = (json.loads(_git(root, "show", f"{ref}:{name}")), current)

    def summary(text: str) -> dict:
        return json.loads(text).get("summary", {}) if text else {}

    listed = _git(root, "ls-tree", "--name-only", ref, METRICS).strip()
    committed_summary = summary(_git(root, "show", f"{ref}:{METRICS}") if listed else "")
    current_summary = summary((root / METRICS).read_text() if (root / METRICS).is_file() else "")
    return judge(committed_lock, current_lock, environments, committed_summary, current_summary)
