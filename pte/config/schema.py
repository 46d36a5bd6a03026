"""Parsing and validation helpers of the ``params.yaml`` sections: typed coercion of YAML values into frozen
dataclasses, and errors that name the key, the value and what is allowed.

It imports nothing from the package, so every module that declares a section (``pte.config.engine``,
``pte.config.training``, ``pte.config.pipeline``, ``pte.data.rows``, ``pte.engine.adapters``) can use it without an
import cycle; ``pte.config`` assembles the sections (docs/pipeline.md, "Configuration").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

__all__ = ["check_range", "fail", "plain", "section_from_dict"]


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise the ``ValueError`` of an invalid ``params.yaml`` value: ``key`` (dotted), ``value`` and what is allowed."""
    raise ValueError(f"params: `{key}` = {value!r} is invalid; allowed: {allowed}.")


def check_range(key: str, value: float | int | None, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Fail unless ``value`` (None always passes) lies in the interval from ``lo`` to ``hi`` (open ends when asked)."""
    if value is None:
        return
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        fail(key, value, f"a number in {left}{lo_s}, {hi_s}{right}")


def plain(obj: Any) -> Any:
    """``obj`` as plain data: dicts and lists all the way down (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
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
    if origin is dict:  # its entries are checked by the dataclass that declares it
        return dict(value) if isinstance(value, dict) else _NO
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


MOVED_KEYS = {
    "train.threads": "numerics.threads", "warmstart.threads": "numerics.threads",
    "train.rollout_batch": "train.rollout.batch", "train.check_replay": "train.rollout.check_replay",
    "train.replay_tolerance": "train.rollout.replay_tolerance",
    "train.replay_tolerance_bf16": "train.rollout.replay_tolerance_bf16",
    **{f"train.sft_{k}": f"train.sft.{k}" for k in ("recall_weight", "recall_steps", "recall_weight_after",
                                                     "eviction_weight", "eviction_steps")},
    **{f"train.distill_{k}": f"train.distill.{k}" for k in ("beta", "source", "nll_weight")},
    **{f"grpo.{k}": f"train.rollout.{k}" for k in ("num_generations", "max_completion_length", "temperature", "top_p",
                                                    "top_k")},
    **{f"grpo.{k}": f"train.grpo.{k}" for k in ("loss_type", "epsilon", "epsilon_high", "delta", "beta", "kl_cache",
                                                 "kl_estimator", "scale_rewards", "use_bias_correction_kl", "reward")},
    "grpo.allow_last_number": "data.allow_last_number", "evaluate.allow_last_number": "data.allow_last_number",
    "evaluate.evict_ratio": "cache.evict_ratio", "evaluate.compile_decode": "cache.compile_decode",
    "pte.write": "pte.extensions.write", "pte.write_context": "pte.extensions.write_context",
    "pte.gate_horizon": "pte.extensions.grad_horizon",
}
"""Keys that moved: ``old -> new``, named in the error a file with the old key gets (one key per setting, each in
the section of the concern that reads it: docs/pipeline.md, "Configuration")."""


REMOVED_KEYS = {"pte.write_gate": ("the learned write gate", False),
                "pte.read": ("the selective and gated reads", "linear")}
"""Settings that were removed -> (what they switched on, their value when off): refuted extensions
(research/log.md) that last ran at commit :data:`LAST_COMMIT_WITH_REMOVED`, named in the error a file that sets them
gets (an adapter's saved settings may hold the off value: it loads)."""

LAST_COMMIT_WITH_REMOVED = "9b921cb"


def moved(key: str) -> typing.NoReturn:
    """Raise the error of a key that moved (:data:`MOVED_KEYS`)."""
    raise ValueError(f"params: `{key}` moved to `{MOVED_KEYS[key]}`; write it there (docs/pipeline.md, "
                     "\"Configuration\").")


def removed(key: str) -> typing.NoReturn:
    """Raise the error of a removed setting (:data:`REMOVED_KEYS`)."""
    raise ValueError(f"params: `{key}` ({REMOVED_KEYS[key][0]}, refuted: research/log.md) was removed; delete the key, "
                     f"or check out commit {LAST_COMMIT_WITH_REMOVED} to reproduce its results.")


def section_from_dict(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``data`` of section ``section``, validating every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(section, data, f"a mapping with keys {[f.name for f in dataclasses.fields(cls)]}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if f"{section}.{key}" in MOVED_KEYS:
            moved(f"{section}.{key}")
        if f"{section}.{key}" in REMOVED_KEYS:
            removed(f"{section}.{key}")
        if key not in names:
            raise ValueError(f"params: unknown key `{section}.{key}`; known keys of `{section}`: {sorted(names)}.")
    kwargs = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):  # a nested section, e.g. train.sft
            kwargs[key] = section_from_dict(hints[key], value, f"{section}.{key}")
            continue
        out = _coerce(value, hints[key])
        if out is _NO:
            fail(f"{section}.{key}", value, _type_name(hints[key]))
        kwargs[key] = out
    return cls(**kwargs)
