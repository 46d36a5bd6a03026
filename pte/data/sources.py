"""Math problem sources -> normalized rows ``{id, source, problem, answer}``.

Three kinds of source, all named by a string in ``params.yaml`` (``data.train[i].name``):

* ``reasoning_gym:<dataset>``: procedural generators of the ``reasoning-gym`` package (offline), e.g.
  ``gsm_symbolic``, ``basic_arithmetic``, ``chain_sum``, ``simple_equations``; generator settings pass through
  ``kwargs``. Item ``i`` of seed ``s`` is generated from ``Random(s + i)`` for most generators, so seeds ``s`` and
  ``s + 1`` share all but one item: keep the seeds of different splits far apart (overlaps are removed anyway).
* ``var_chain``: our own seeded generator (``pte.data.tasks``) of programs whose last step needs an early result, the
  task on which a bounded cache hurts; its settings (``steps``, ``recall``, ``min_gap``, ``min_depth``) pass through
  ``kwargs``. Item ``i`` of seed ``s`` depends only on ``(s, i)``.
* ``champ``: the 270 CHAMP competition problems shipped inside the ``champ-dataset`` package (offline).
* hub datasets (:data:`HUB_SOURCES`): DAPO-Math-17K and the paper's six benchmarks, through
  ``datasets.load_dataset`` at a pinned revision, or from a local ``.jsonl``/``.json``/``.parquet`` file with the
  hub's columns (``local_path``), which is how they run offline.

Answers are normalized to plain strings (numbers without a trailing ``.0``, lists joined by ``", "``, one
surrounding ``$...$`` removed); nothing here judges equivalence (that is ``rewards.py``).

This module knows nothing about prompts, splits, tokenizers or training; ``data.py`` builds on it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pte.data.tasks import TASKS

__all__ = ["HUB_SOURCES", "HubSource", "OFFLINE_SOURCES", "Row", "SourceSpec", "SourceUnavailableError",
           "check_spec", "hub_offline", "known_sources", "load_source"]

RG_PREFIX = "reasoning_gym:"
OFFLINE_SOURCES = ("champ", "var_chain", RG_PREFIX + "<dataset>")
"""Sources that never need the network."""
_CHAMP_KWARGS = frozenset({"numeric_only"})
_NUMERIC_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


class SourceUnavailableError(RuntimeError):
    """A hub source could not be loaded (offline, not cached, unreachable, or a wrong path/revision/split)."""


@dataclass(frozen=True)
class Row:
    """One problem in the normalized schema shared by every source and by ``data/*.jsonl``."""

    id: str
    """Unique across the train and eval files: ``<source>:<own id>`` (``<source>:<seed>:<index>`` for generators)."""
    source: str
    """The source name that produced the row (``champ``, ``math500``, ``reasoning_gym:chain_sum``...)."""
    problem: str
    """Problem statement, without any instruction or chat template."""
    answer: str
    """Final answer as a non-empty string, the gold value for ``rewards.is_equivalent``."""

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "source": self.source, "problem": self.problem, "answer": self.answer}


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Row))


@dataclass(frozen=True)
class HubSource:
    """Where a hub dataset lives and which columns hold the problem, the answer and an id.

    Field names may be dotted paths into nested columns (``reward_model.ground_truth``, ``prompt.0.content``).
    """

    path: str
    split: str
    problem_field: str
    answer_field: str
    config: str | None = None
    revision: str = "main"
    id_field: str | None = None
    """Column with the dataset's own id; None = the row's position in the split."""
    context_field: str | None = None
    """Optional column whose text, when non-empty, precedes the problem (OlympiadBench ``context``)."""
    strip_prefix: str = ""
    strip_suffix: str = ""
    """Instruction text wrapped around the problem in the dataset, removed so our own template applies."""
    rows: int | None = None
    """Documented row count of the split (informational)."""


_DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
                "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

HUB_SOURCES: dict[str, HubSource] = {
    # Deduplicated DAPO-Math-17K, English subset; ``prompt`` is the original DAPO user message, ``solution`` the
    # original reward_model.ground_truth (open-r1's create_dataset.py). The "all" config keeps the Chinese rows.
    "dapo_math_17k": HubSource("open-r1/DAPO-Math-17k-Processed", "train", "prompt", "solution", config="en",
                               id_field="extra_info.index", strip_prefix=_DAPO_PREFIX, strip_suffix=_DAPO_SUFFIX),
    "math500": HubSource("HuggingFaceH4/MATH-500", "test", "problem", "answer", id_field="unique_id", rows=500),
    # Open-ended, text-only, English competition maths; final_answer is a list of LaTeX strings in $...$.
    "olympiadbench": HubSource("Hothan/OlympiadBench", "train", "question", "final_answer",
                               config="OE_TO_maths_en_COMP", id_field="id", context_field="context", rows=674),
    "minerva_math": HubSource("math-ai/minervamath", "test", "question", "answer", rows=272),
    "amc23": HubSource("math-ai/amc23", "test", "question", "answer", id_field="id", rows=40),
    "aime24": HubSource("HuggingFaceH4/aime_2024", "train", "problem", "answer", id_field="id", rows=30),
    "aime25": HubSource("math-ai/aime25", "test", "problem", "answer", id_field="id", rows=30),
}
"""Hub sources by name. Pin ``revision`` per source in params (``data.eval[i].revision``) for exact reproducibility."""
_HUB_KWARGS = frozenset({"path", "config", "problem_field", "answer_field", "id_field", "context_field",
                         "strip_prefix", "strip_suffix"})
_HUB_NULLABLE = frozenset({"config", "id_field", "context_field"})


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.train`` / ``data.eval``: which source, how many rows, with which seed."""

    name: str
    """``champ``, ``reasoning_gym:<dataset>`` or a key of :data:`HUB_SOURCES`."""
    count: int | None = None
    """Rows to take; null = all (required for generators). A subset of a fixed dataset is a seeded sample. Not named
    ``size``: DVC's run cache ignores params named ``size`` (treeverse/dvc#10296; docs/pipeline.md)."""
    seed: int = 0
    """Generator seed, or the seed of the subset sample of a fixed dataset."""
    split: str | None = None
    """Hub sources only: the split to load (null = the registry's)."""
    revision: str | None = None
    """Hub sources only: branch, tag or commit sha (null = the registry's, ``main``)."""
    local_path: str | None = None
    """Hub sources and champ: read this ``.jsonl``/``.json``/``.parquet`` file (same columns) instead."""
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    """Generator settings (reasoning_gym), ``numeric_only`` (champ), or column overrides (hub: path, config,
    problem_field, answer_field, id_field, context_field, strip_prefix, strip_suffix)."""


def known_sources() -> list[str]:
    """Every accepted source name (generators as ``reasoning_gym:<dataset>``)."""
    return ["champ", *sorted(TASKS), RG_PREFIX + "<dataset>", *sorted(HUB_SOURCES)]


def check_spec(spec: SourceSpec, key: str) -> None:
    """Validate what can be checked without importing the source's package; ``key`` names it in errors."""
    kind = _kind(spec.name)
    if kind is None:
        raise ValueError(f"params: `{key}.name` = {spec.name!r} is not a known data source; known: "
                         f"{known_sources()} (generators e.g. reasoning_gym:chain_sum, reasoning_gym:gsm_symbolic).")
    if spec.count is not None and spec.count < 1:
        raise ValueError(f"params: `{key}.count` = {spec.count!r} is invalid; allowed: an integer >= 1, or null for all.")
    if kind in ("reasoning_gym", "task") and spec.count is None:
        raise ValueError(f"params: `{key}.count` is null but {spec.name} is a generator; set a number of problems.")
    for opt in ("split", "revision"):
        if kind != "hub" and getattr(spec, opt) is not None:
            raise ValueError(f"params: `{key}.{opt}` is set but {spec.name} is not a hub source; remove it.")
    if kind in ("reasoning_gym", "task") and spec.local_path is not None:
        raise ValueError(f"params: `{key}.local_path` is set but {spec.name} is a generator; remove it.")
    if not isinstance(spec.kwargs, dict) or not all(isinstance(k, str) for k in spec.kwargs):
        raise ValueError(f"params: `{key}.kwargs` = {spec.kwargs!r} is invalid; allowed: a mapping of settings.")
    allowed = {"champ": _CHAMP_KWARGS, "hub": _HUB_KWARGS}.get(kind)
    if kind == "task":
        allowed = frozenset(f.name for f in dataclasses.fields(TASKS[spec.name][0]))
    unknown = sorted(set(spec.kwargs) - allowed) if allowed is not None else []
    if unknown:
        raise ValueError(f"params: unknown key(s) {unknown} in `{key}.kwargs`; allowed for {spec.name}: "
                         f"{sorted(allowed)}.")
    for k, v in spec.kwargs.items():
        if kind == "champ" and not isinstance(v, bool):
            raise ValueError(f"params: `{key}.kwargs.{k}` = {v!r} is invalid; allowed: true/false.")
        if kind == "hub" and not (isinstance(v, str) or (v is None and k in _HUB_NULLABLE)):
            raise ValueError(f"params: `{key}.kwargs.{k}` = {v!r} is invalid; allowed: a string (a column name or "
                             f"text){', or null' if k in _HUB_NULLABLE else ''}.")


def load_source(spec: SourceSpec, key: str = "source") -> list[Row]:
    """Rows of one source, deterministic in ``spec``.

    Raises:
        ValueError: bad settings or bad rows (the message names ``key`` or the file and row).
        SourceUnavailableError: a hub source is not available (offline and not cached, or unreachable).
    """
    check_spec(spec, key)
    kind = _kind(spec.name)
    if kind == "reasoning_gym":
        return _reasoning_gym(spec, key)
    if kind == "task":
        return _task(spec, key)
    if kind == "champ":
        return _champ(spec, key)
    return _hub(spec, key)


def _kind(name: str) -> str | None:
    if name == "champ":
        return "champ"
    if name in TASKS:
        return "task"
    if name.startswith(RG_PREFIX) and len(name) > len(RG_PREFIX):
        return "reasoning_gym"
    return "hub" if name in HUB_SOURCES else None


def _subset(n: int, spec: SourceSpec, key: str, what: str) -> list[int]:
    """Indices of a fixed dataset to keep: all, or a seeded sample of ``spec.count`` kept in dataset order."""
    if spec.count is None:
        return list(range(n))
    if spec.count > n:
        raise ValueError(f"params: `{key}.count` = {spec.count} but {what} has only {n} rows; "
                         f"set count to at most {n}, or null for all.")
    return sorted(random.Random(spec.seed).sample(range(n), spec.count))


def _answer_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(a for a in (_answer_text(v) for v in value) if a)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    for wrap in ("$$", "$"):
        inner = text[len(wrap):-len(wrap)]
        if len(text) > 2 * len(wrap) and text.startswith(wrap) and text.endswith(wrap) and "$" not in inner:
            return inner.strip()
    return text


def _make_row(source: str, own_id: Any, problem: Any, answer: Any, where: str) -> Row:
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: the problem is missing or empty ({problem!r}); every row needs problem text.")
    text = _answer_text(answer)
    if not text:
        raise ValueError(f"{where}: the answer is missing or empty ({answer!r}); every row needs a final answer.")
    return Row(id=f"{source}:{own_id}", source=source, problem=problem.strip(), answer=text)


# ----------------------------------------------------------------------------------------------------------------------
# reasoning-gym


def _reasoning_gym(spec: SourceSpec, key: str) -> list[Row]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    dataset = spec.name[len(RG_PREFIX):]
    if dataset not in DATASETS:
        raise ValueError(f"params: `{key}.name` = {spec.name!r}: reasoning-gym has no dataset {dataset!r}; known: "
                         f"{sorted(DATASETS)}.")
    settings = [f.name for f in dataclasses.fields(DATASETS[dataset][1]) if f.name not in ("seed", "size")]
    if {"seed", "size"} & set(spec.kwargs):
        raise ValueError(f"params: `{key}.kwargs` sets seed/size; set `{key}.seed` and `{key}.count` instead.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.kwargs.items()}
    try:
        items = list(reasoning_gym.create_dataset(dataset, size=spec.count, seed=spec.seed, **kwargs))
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ValueError(f"params: `{key}.kwargs` = {spec.kwargs!r} is invalid for {spec.name} "
                         f"({type(exc).__name__}: {exc}); allowed keys: {settings}.") from None
    return [_make_row(spec.name, f"{spec.seed}:{i}", item.get("question"), item.get("answer"),
                      f"{spec.name} seed {spec.seed} item {i}") for i, item in enumerate(items)]


# ----------------------------------------------------------------------------------------------------------------------
# Our own generators (pte.data.tasks)


def _task(spec: SourceSpec, key: str) -> list[Row]:
    settings, make = TASKS[spec.name]
    try:
        cfg = settings(**spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params: `{key}.kwargs` = {spec.kwargs!r} is invalid for {spec.name}: {exc}") from None
    return [_make_row(spec.name, f"{spec.seed}:{i}", *make(cfg, spec.seed, i), f"{spec.name} item {i}")
            for i in range(spec.count or 0)]


# ----------------------------------------------------------------------------------------------------------------------
# CHAMP


def champ_file() -> Path:
    """``champ_dataset/dataset_files/v0.json`` of the installed package, located without importing it."""
    found = importlib.util.find_spec("champ_dataset")
    if found is None or not found.submodule_search_locations:
        raise SourceUnavailableError("data source 'champ' needs the champ-dataset package: "
                                     "pip install champ-dataset==1.0.0 (or set local_path to a CHAMP v0.json file).")
    return Path(list(found.submodule_search_locations)[0]) / "dataset_files" / "v0.json"


@functools.lru_cache(maxsize=4)
def _champ_problems(path: str) -> tuple[tuple[str, Any, Any], ...]:
    try:
        problems = json.loads(Path(path).read_text(encoding="utf-8"))["problems"]
        return tuple((str(pid), p.get("_text"), p.get("_answer")) for pid, p in problems.items())
    except FileNotFoundError:
        raise FileNotFoundError(f"CHAMP file {path!r} not found; reinstall champ-dataset or fix local_path.") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"CHAMP file {path!r} is not in the CHAMP v0.json format ({type(exc).__name__}: {exc}); "
                         "expected {'problems': {id: {'_text': ..., '_answer': ...}}}.") from None


def _champ(spec: SourceSpec, key: str) -> list[Row]:
    path = str(Path(spec.local_path) if spec.local_path else champ_file())
    problems = _champ_problems(path)
    if spec.kwargs.get("numeric_only", False):
        problems = tuple(p for p in problems if _NUMERIC_RE.fullmatch(str(p[2]).strip()))
    keep = _subset(len(problems), spec, key, "champ" + (" (numeric_only)" if spec.kwargs.get("numeric_only") else ""))
    return [_make_row("champ", problems[i][0], problems[i][1], problems[i][2], f"{path} problem {problems[i][0]}")
            for i in keep]


# ----------------------------------------------------------------------------------------------------------------------
# Hub datasets and their local copies


def hub_offline(keys: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) -> bool:
    """Whether any of the HF offline variables ``keys`` is set true, read as huggingface_hub reads them."""
    flags = (os.environ.get(k, "").strip().upper() for k in keys)
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _get(record: Any, path: str) -> Any:
    value = record
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl`` (one object per line), ``.json`` (a list of objects, or a mapping of columns)
    or ``.parquet`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"local data file {str(path)!r} not found; fix local_path.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"local data file {str(path)!r}: unsupported extension {suffix!r}; use .jsonl, .json or "
                         ".parquet.")
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside strings
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg}).") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}).") from None
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            data = [dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
        records = data if isinstance(data, list) else None
    if records is None or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected JSON objects (one per line, a list of objects, or a mapping of columns).")
    return records


def _from_hub(name: str, hub: HubSource, spec: SourceSpec, key: str) -> list[dict[str, Any]]:
    split = spec.split or hub.split
    revision = spec.revision or hub.revision
    where = f"{hub.path}" + (f" (config {hub.config})" if hub.config else "") + f" @ {revision}, split {split!r}"
    fix = (f"set `{key}.local_path` to a .jsonl/.json/.parquet copy with columns {hub.problem_field!r} and "
           f"{hub.answer_field!r}, run with network access (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), or use the "
           f"offline sources {list(OFFLINE_SOURCES)}")
    try:
        import datasets

        ds = datasets.load_dataset(hub.path, hub.config, revision=revision, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        state = ("the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not in the local HF cache"
                 if hub_offline() else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise SourceUnavailableError(f"data source {name!r} ({key}): cannot load {where}: {state}. "
                                     f"Fix: {fix}.") from None
    return ds.to_list()


def _hub(spec: SourceSpec, key: str) -> list[Row]:
    hub = dataclasses.replace(HUB_SOURCES[spec.name], **spec.kwargs)
    if spec.local_path:
        records, origin = read_records(Path(spec.local_path)), spec.local_path
    else:
        records, origin = _from_hub(spec.name, hub, spec, key), hub.path
    rows = []
    for i in _subset(len(records), spec, key, f"{spec.name} ({origin})"):
        rec = records[i]
        problem = _get(rec, hub.problem_field)
        if isinstance(problem, str):
            problem = problem.removeprefix(hub.strip_prefix).removesuffix(hub.strip_suffix)
            context = _get(rec, hub.context_field) if hub.context_field else None
            if isinstance(context, str) and context.strip():
                problem = f"{context.strip()}\n\n{problem.strip()}"
        own_id = _get(rec, hub.id_field) if hub.id_field else None
        rows.append(_make_row(spec.name, i if own_id is None else own_id, problem, _get(rec, hub.answer_field),
                              f"{origin} row {i} (columns {hub.problem_field!r}/{hub.answer_field!r})"))
    return rows
