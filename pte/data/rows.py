"""Training and evaluation data: sources -> disjoint rows -> ``data/{train,eval,warmstart}.jsonl``; prompt text.

What it does:
    * :class:`DataConfig` (the ``data:`` section of ``params.yaml``) lists the train, eval and warm-start sources
      (:class:`~pte.data.sources.SourceSpec`) and the prompt template; :func:`data_config_from_dict` parses it.
    * :func:`build_splits` loads every source (``sources.py``) and guarantees that no eval problem appears in train
      or warm-start rows, and no train problem in warm-start rows: rows whose normalized problem text (lower-cased,
      whitespace collapsed) occurs in an earlier split are dropped and counted; repeated problems inside a split
      are dropped too (``dedupe``); ids are unique across the three splits.
    * :func:`write_jsonl` / :func:`read_jsonl`: the one row schema ``{id, source, problem, answer}``, written
      byte-identically on reruns and validated line by line on reading (errors name the file and the line).
    * :func:`format_prompt` / :func:`chat_messages`: the user message (problem + instruction) and the chat
      messages (:func:`prompt_messages`, the one message builder); applying the tokenizer's chat template is
      ``inference.encode_prompts``' job.
    * :func:`prepare_data`: the ``data`` pipeline stage.

The paper trains on DAPO-Math-17K and evaluates on six benchmarks (paper §3); those are hub sources
here. The offline default uses reasoning-gym generators and CHAMP (docs/method.md, "Data and warm start"). This
module knows nothing about tokenizers, models, rewards or training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pte.data.sources import HUB_SOURCES, ROW_FIELDS, Row, SourceSpec, check_spec, load_source

__all__ = ["DataConfig", "HUB_SOURCES", "PROMPT_TEMPLATES", "Row", "SourceSpec", "build_splits", "chat_messages",
           "data_config_from_dict", "format_prompt", "normalize_problem", "prepare_data", "prompt_messages",
           "read_jsonl", "write_json", "write_jsonl"]

log = logging.getLogger(__name__)

PROMPT_TEMPLATES: dict[str, str] = {
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # DAPO-Math-17K's own instruction (its dataset card); rewards.extract_answer reads the "Answer:" line.
    "dapo": ("Solve the following math problem step by step. The last line of your response should be of the form "
             "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
             'Remember to put your answer on its own line after "Answer:".'),
}
"""Named prompt templates; ``data.prompt_template`` is one of these names or a text containing ``{problem}``."""

_EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
SPLITS = ("train", "eval", "warmstart")
_EVAL_SEED = 1_000_003  # far from the train seeds: reasoning-gym item i of seed s is Random(s + i)


@dataclass(frozen=True)
class DataConfig:
    """The ``data:`` section: which problems to train and evaluate on, and how to phrase them."""

    train: tuple[SourceSpec, ...] = (
        SourceSpec("reasoning_gym:chain_sum", count=512, seed=0, kwargs=dict(_EASY)),
        SourceSpec("reasoning_gym:gsm_symbolic", count=128, seed=0),
    )
    """Training sources, concatenated in this order."""
    eval: tuple[SourceSpec, ...] = (
        SourceSpec("reasoning_gym:chain_sum", count=64, seed=_EVAL_SEED, kwargs=dict(_EASY)),
        SourceSpec("reasoning_gym:gsm_symbolic", count=32, seed=_EVAL_SEED),
        SourceSpec("champ", count=32, seed=0, kwargs={"numeric_only": True}),
    )
    """Held-out evaluation sources; their problems are removed from train."""
    warmstart: tuple[SourceSpec, ...] = ()
    """Problems whose worked solutions the ``warmstart`` stage fine-tunes on (``pte.data.tasks.worked_solution`` must
    solve them); any that also occur in eval or train are removed. Empty = no warm start data."""
    prompt_template: str = "boxed"
    """A key of :data:`PROMPT_TEMPLATES`, or a text containing ``{problem}`` (the only placeholder)."""
    system_prompt: str | None = None
    """Optional system message placed before the user message."""
    dedupe: bool = True
    """Drop repeated problems inside each split (the first is kept); overlap with eval is always removed."""
    allow_last_number: bool = False
    """The answer oracle, for the training reward and the evaluation alike: accept the last number of a completion
    as its answer when it has no \\boxed{} / Answer: line."""

    def __post_init__(self) -> None:
        for split in SPLITS:
            specs = getattr(self, split)
            if not specs and split != "warmstart":
                raise ValueError(f"params: `data.{split}` is empty; list at least one source, e.g. "
                                 "{name: champ} or {name: reasoning_gym:chain_sum, count: 100, seed: 0}.")
            for i, spec in enumerate(specs):
                if not isinstance(spec, SourceSpec):
                    raise ValueError(f"params: `data.{split}[{i}]` = {spec!r} is invalid; allowed: a SourceSpec.")
                check_spec(spec, f"data.{split}[{i}]")
        template = PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)
        if template.count("{problem}") != 1:
            raise ValueError(f"params: `data.prompt_template` = {self.prompt_template!r} is invalid; allowed: one of "
                             f"{sorted(PROMPT_TEMPLATES)}, or a text containing {{problem}} exactly once.")

    @property
    def template(self) -> str:
        """The resolved prompt template text."""
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, section: str = "data") -> DataConfig:
        """Same as :func:`data_config_from_dict` (nested source lists need more than ``section_from_dict``)."""
        return data_config_from_dict(data, section)


def _spec_from_dict(data: Any, key: str) -> SourceSpec:
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"params: `{key}` = {data!r} is invalid; allowed: a source name or a mapping with `name` "
                         "(and count, seed, split, revision, local_path, kwargs).")
    if "size" in data:  # renamed: DVC's run cache drops params named `size` (treeverse/dvc#10296; docs/pipeline.md)
        raise ValueError(f"params: `{key}.size` was renamed `{key}.count` (DVC's run cache ignores params named size, "
                         f"so a changed size restored the old split); write count: {data['size']!r}.")
    kwargs = data.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"params: `{key}.kwargs` = {kwargs!r} is invalid; allowed: a mapping of settings.")
    from pte.config.schema import section_from_dict  # here: pte.config imports this module (DataConfig)

    spec = section_from_dict(SourceSpec, {k: v for k, v in data.items() if k != "kwargs"}, key)
    return dataclasses.replace(spec, kwargs=dict(kwargs))


def data_config_from_dict(data: dict[str, Any] | None, section: str = "data") -> DataConfig:
    """Validate the ``data:`` mapping of ``params.yaml`` and build :class:`DataConfig`.

    ``train``/``eval`` are lists whose entries are a source name or a mapping ``{name, count, seed, split, revision,
    local_path, kwargs}``; the other keys are scalars, checked by :func:`pte.config.schema.section_from_dict`.

    Raises:
        ValueError: unknown key or invalid value; the message names it (``data.train[1].count``) and what is allowed.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"params: `{section}` = {data!r} is invalid; allowed: a mapping with keys "
                         f"{[f.name for f in dataclasses.fields(DataConfig)]}.")
    specs = {}
    for split in SPLITS:
        if split in data:
            entries = data[split]
            if not isinstance(entries, list):
                raise ValueError(f"params: `{section}.{split}` = {entries!r} is invalid; allowed: a list of sources.")
            specs[split] = tuple(_spec_from_dict(e, f"{section}.{split}[{i}]") for i, e in enumerate(entries))
    from pte.config.schema import section_from_dict

    cfg = section_from_dict(DataConfig, {k: v for k, v in data.items() if k not in specs}, section)
    return dataclasses.replace(cfg, **specs)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def format_prompt(problem: str, cfg: DataConfig) -> str:
    """The user message for ``problem``: the template with ``{problem}`` replaced (no chat template applied)."""
    return cfg.template.replace("{problem}", problem)


def prompt_messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one prompt: ``system`` (when given) then the ``user`` message. The one builder of chat
    messages: the warm start (:func:`chat_messages`), the rollouts, the evaluation and the predictor
    (``pte.engine.inference.encode_prompts``) all go through it, so they phrase a problem identically."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}]


def chat_messages(problem: str, cfg: DataConfig) -> list[dict[str, str]]:
    """Chat messages for ``problem``: an optional system message, then the user message of :func:`format_prompt`."""
    return prompt_messages(format_prompt(problem, cfg), cfg.system_prompt)


# ----------------------------------------------------------------------------------------------------------------------
# JSONL


def write_json(path: str | Path, data: Any, allow_nan: bool = True) -> None:
    """Write ``data`` as indented, key-sorted JSON (a stable byte layout for DVC), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n")


def write_jsonl(rows: Iterable[Row], path: str | Path) -> None:
    """Write rows as JSON lines (sorted keys, UTF-8, ``\\n`` after every line) atomically; byte-identical on reruns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, path)


def _row_from_line(line: str, where: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); every line must be one JSON "
                         f"object with keys {list(ROW_FIELDS)}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(ROW_FIELDS)}, got {type(obj).__name__}.")
    unknown = sorted(set(obj) - set(ROW_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; a row has exactly the fields {list(ROW_FIELDS)}.")
    for name in ROW_FIELDS:
        if name not in obj:
            raise ValueError(f"{where}: field {name!r} is missing; every row needs {list(ROW_FIELDS)}.")
        if not isinstance(obj[name], str):
            raise ValueError(f"{where}: field {name!r} is {type(obj[name]).__name__} ({obj[name]!r}), not a string; "
                             f"write it as a JSON string, e.g. \"{obj[name]}\".")
        if not obj[name].strip():
            need = "a non-empty final answer" if name == "answer" else f"a non-empty {name}"
            raise ValueError(f"{where}: field {name!r} is empty; every row needs {need}.")
    return Row(**obj)


def read_jsonl(path: str | Path) -> list[Row]:
    """Read and validate a rows file written by :func:`write_jsonl` (or by hand). Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid JSON, a missing, unknown, non-string or empty field, or duplicate ids; the message names
            the file and the 1-based line number(s).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found; run the `data` stage (dvc repro data) first.")
    rows: list[Row] = []
    lines_of: dict[str, list[int]] = {}
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} line {n}: not valid UTF-8 ({exc.reason}).") from None
        if line.strip():
            row = _row_from_line(line, f"{path} line {n}")
            rows.append(row)
            lines_of.setdefault(row.id, []).append(n)
    dups = [(i, ns) for i, ns in lines_of.items() if len(ns) > 1]
    if dups:
        shown = "; ".join(f"{i!r} (lines {', '.join(map(str, ns))})" for i, ns in dups[:5])
        more = f"; and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ValueError(f"{path}: {len(dups)} duplicate id(s): {shown}{more}; every row needs a unique id.")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Splits


def normalize_problem(problem: str) -> str:
    """The key used to detect the same problem twice: lower-cased, whitespace collapsed."""
    return " ".join(problem.lower().split())


def _dedupe(rows: list[Row]) -> tuple[list[Row], int]:
    seen: set[str] = set()
    kept = []
    for r in rows:
        k = normalize_problem(r.problem)
        if k not in seen:
            seen.add(k)
            kept.append(r)
    return kept, len(rows) - len(kept)


def _counts(rows: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.source] = out.get(r.source, 0) + 1
    return dict(sorted(out.items()))


def _assemble(cfg: DataConfig) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    loaded = {split: [r for i, spec in enumerate(getattr(cfg, split)) for r in load_source(spec, f"data.{split}[{i}]")]
              for split in SPLITS}
    kept: dict[str, list[Row]] = {}
    overlap, dups = {}, dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    # eval first (held out), then train, then warm start: each drops what an earlier one holds, so warm-start
    # problems are disjoint from eval and from train (GRPO should not see memorized answers)
    for split in ("eval", "train", "warmstart"):
        rows = [r for r in loaded[split] if normalize_problem(r.problem) not in seen]
        overlap[split] = len(loaded[split]) - len(rows)
        if cfg.dedupe:
            rows, dups[split] = _dedupe(rows)
        kept[split] = rows
        seen |= {normalize_problem(r.problem) for r in rows}
    splits = {split: kept[split] for split in SPLITS}
    _check_unique_ids(splits)
    stats = {**{split: {"rows": len(rows), "per_source": _counts(rows)} for split, rows in splits.items()},
             "generated": {split: len(rows) for split, rows in loaded.items()},
             "dropped": {"train_overlapping_eval": overlap["train"],
                         "warmstart_overlapping_train_or_eval": overlap["warmstart"],
                         **{f"{split}_duplicates": n for split, n in dups.items()}}}
    return splits, stats


def _check_unique_ids(splits: dict[str, list[Row]]) -> None:
    where: dict[str, list[str]] = {}
    for split, rows in splits.items():
        for i, r in enumerate(rows):
            where.setdefault(r.id, []).append(f"{split}[{i}]")
    dups = [(i, w) for i, w in where.items() if len(w) > 1]
    if dups:
        shown = "; ".join(f"{i!r} at {', '.join(w)}" for i, w in dups[:5])
        raise ValueError(f"data: {len(dups)} id(s) occur more than once across {'/'.join(splits)}: {shown}. Two "
                         "entries of the same source with the same seed but different settings give the same ids; "
                         "give them different seeds (far apart for reasoning_gym).")


def build_splits(cfg: DataConfig) -> dict[str, list[Row]]:
    """Load every source of ``cfg``: ``{"train": rows, "eval": rows, "warmstart": rows}``, deterministic in ``cfg``.

    No train or warm-start problem equals an eval problem, and no warm-start problem equals a train problem, after
    :func:`normalize_problem` (such rows are dropped and counted); ids are unique across the three lists.

    Raises:
        ValueError: bad settings, bad rows, or colliding ids (the message says which).
        pte.data.sources.SourceUnavailableError: a hub source is offline/unreachable and has no ``local_path``.
    """
    splits, stats = _assemble(cfg)
    _log_stats(stats)
    return splits


def _log_stats(stats: dict[str, Any]) -> None:
    d = stats["dropped"]
    log.info("data: %d train rows %s, %d eval rows %s, %d warm-start rows %s; dropped %d train rows that overlap eval, "
             "%d warm-start rows that overlap train or eval, %d/%d/%d repeated problems in train/eval/warmstart",
             stats["train"]["rows"], stats["train"]["per_source"], stats["eval"]["rows"], stats["eval"]["per_source"],
             stats["warmstart"]["rows"], stats["warmstart"]["per_source"], d["train_overlapping_eval"],
             d["warmstart_overlapping_train_or_eval"], d["train_duplicates"], d["eval_duplicates"],
             d["warmstart_duplicates"])


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """The ``data`` stage: write ``out_dir/{train,eval,warmstart}.jsonl``; byte-identical on reruns.

    ``warmstart.jsonl`` is empty when ``data.warmstart`` lists no source.

    Returns:
        Summary stats: per split (``train``, ``eval``, ``warmstart``) ``rows`` and ``per_source``; ``generated``
        (rows before filtering) and ``dropped`` (overlaps and repeats removed, per split).
    """
    splits, stats = _assemble(cfg)
    _log_stats(stats)
    out = Path(out_dir)
    for split, rows in splits.items():
        write_jsonl(rows, out / f"{split}.jsonl")
    return stats
