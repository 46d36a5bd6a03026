"""Typed, frozen configuration: one dataclass per concern, loaded from ``params.yaml``.

``load_params`` is the only YAML reader in the package. Every section of the file maps to one
dataclass with the same field names; unknown sections or keys and values of the wrong type or out of
range raise ``ValueError`` naming the key, the value and what is allowed. Derived quantities are
methods, never extra YAML keys.

The sections live with their concern and this module assembles them (docs/pipeline.md, "Configuration"):
``pte.config.engine`` (model, cache, adapter, pte), ``pte.config.training`` (train with its objectives and
rollouts, warmstart), ``pte.config.pipeline`` (evaluate, tracking, registry), ``pte.config.numerics`` (numerics) and
``pte.data.rows`` (data); the parsing helpers are ``pte.config.schema``. Every name stays importable from here.
No module of them imports this one, so there is no import cycle.

This module knows nothing about models, tensors or the pipeline stages that consume it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pte.config.engine import AdapterConfig, CacheConfig, ModelConfig, PTEConfig, PTEExtensions, SamplingConfig
from pte.config.methods import METHODS
from pte.config.numerics import NumericsConfig
from pte.config.pipeline import EvalConfig, RegistryConfig, TrackingConfig
from pte.config.schema import MOVED_KEYS, plain, section_from_dict
from pte.config.training import (
    LOSS_TYPES,
    SUBSECTIONS,
    DistillConfig,
    GRPOConfig,
    RolloutConfig,
    SFTConfig,
    TrainConfig,
    WarmstartConfig,
    check_loss_settings,
)
from pte.data.rows import DataConfig

__all__ = [
    "EVAL_METHODS",
    "LOSS_TYPES",
    "AdapterConfig",
    "BaseConfig",
    "CacheConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "GRPOConfig",
    "ModelConfig",
    "NumericsConfig",
    "Params",
    "PTEConfig",
    "PTEExtensions",
    "RegistryConfig",
    "RolloutConfig",
    "SFTConfig",
    "SamplingConfig",
    "TrackingConfig",
    "TrainConfig",
    "WarmstartConfig",
    "check_loss_settings",
    "load_params",
    "params_from_dict",
    "section_from_dict",
]


@dataclass(frozen=True)
class BaseConfig:
    """Settings shared by every stage."""

    seed: int = 0
    """The one seed of a run; every generator is derived from it."""


EVAL_METHODS = METHODS
"""The same tuple as ``pte.config.methods.METHODS`` (kept under this name for existing imports)."""


@dataclass(frozen=True)
class Params:
    """All sections of ``params.yaml``."""

    base: BaseConfig = field(default_factory=BaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    pte: PTEConfig = field(default_factory=PTEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def __post_init__(self) -> None:
        if self.warmstart.enabled and not self.data.warmstart:
            raise ValueError("params: `warmstart.enabled` is true but `data.warmstart` lists no source; add one, e.g. "
                             "{name: var_chain, count: 256, seed: 7}, or set warmstart.enabled: false.")
        unknown = sorted(set(self.evaluate.protocols) - {s.name for s in self.data.eval})
        if unknown:
            raise ValueError(f"params: `evaluate.protocols` names {unknown}, which are not sources of `data.eval` "
                             f"({[s.name for s in self.data.eval]}); use those names.")
        for method in {*self.train.methods, *self.evaluate.methods}:
            self.pte.for_method(method)  # a contradictory ablation fails here, before anything runs

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (tuples become lists), for logging and checkpoints; without the
        ``train`` subsections the objective does not read, so that it loads back without a warning."""
        data = plain(dataclasses.asdict(self))
        unread = set(SUBSECTIONS) - set(self.train.read_sections())
        data["train"] = {k: v for k, v in data["train"].items() if k not in unread}
        return data


def params_from_dict(data: dict[str, Any] | None) -> Params:
    """Validate a parsed ``params.yaml`` mapping and build ``Params``."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"params: the top level must be a mapping of sections, got {type(data).__name__}.")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    for name in data:
        if name == "grpo":  # the section moved into train (rollout, loss) and data (the answer oracle)
            keys = [f"grpo.{k}" for k in (data[name] or {})]
            raise ValueError("params: the `grpo` section moved: " + (", ".join(
                f"`{k}` -> `{MOVED_KEYS[k]}`" for k in keys if k in MOVED_KEYS) or "rollout settings to "
                "`train.rollout`, the loss and reward to `train.grpo`, `allow_last_number` to `data`") + "; write them "
                "there (docs/pipeline.md, \"Configuration\").")
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
