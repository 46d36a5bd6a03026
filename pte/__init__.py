"""pte: Progressive Thought Encoding — GRPO training of reasoning LLMs under a bounded KV cache.

Shape letters used in docstrings across the package:

* ``B`` rows of a batch (prompts x group samples), ``P`` padded prompt block, ``T`` generated tokens,
* ``W`` thinking-window slots, ``e`` / ``m`` tokens evicted per event, ``S`` cache slots (``P`` + kept thinking),
* ``L`` decoder layers, ``H`` / ``H_kv`` query / key-value heads, ``D`` head dim, ``d_kv = H_kv * D``,
* ``G`` global tokens (rows of the thought state), ``r`` adapter / latent rank, ``V`` vocabulary.

The public API is re-exported lazily (importing ``pte`` does not import torch):
``load_params`` and the config dataclasses, ``load_model``, ``generate`` / ``Generator``, the adapter verbs,
``train`` and ``evaluate_all``.

Layout (imports point down: pipeline -> training -> engine -> config, with data a leaf beside the engine; the
method decisions: docs/method.md; the pipeline seams: docs/pipeline.md):

* ``pte.config``: ``Params`` and ``load_params`` with the sections ``engine``, ``training``, ``pipeline``,
  ``numerics``, the method names (``methods``) and the parsing helpers (``schema``);
* ``pte.engine``: ``models``, ``cache``, ``state``, ``writes``, ``adapters``, ``rollout``, ``replay``, ``inference``;
* ``pte.training``: ``grpo``, ``objectives``, ``train``, ``sensitivity``, ``runtime``, ``checkpoint``, ``warmstart``;
* ``pte.data``: ``sources``, ``tasks``, ``rows``, ``rewards``, ``verifier``;
* ``pte.pipeline``: ``stages``, ``cli``, ``numerics``, ``verdict``, ``evaluate``, ``plots``, ``tracking``, ``registry``,
  ``registry_model``.

The research instruments (the mechanism test, the study runners) live outside the package, in ``research/``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_params": "pte.config", "Params": "pte.config", "CacheConfig": "pte.config", "SamplingConfig": "pte.config",
    "AdapterConfig": "pte.config", "PTEConfig": "pte.config", "GRPOConfig": "pte.config", "TrainConfig": "pte.config",
    "load_model": "pte.engine.models", "generate": "pte.engine.rollout", "Rollout": "pte.engine.rollout",
    "Generator": "pte.engine.inference", "attach_adapter": "pte.engine.adapters", "save_adapter": "pte.engine.adapters",
    "load_adapter": "pte.engine.adapters", "adapters_disabled": "pte.engine.adapters",
    "replay_logprobs": "pte.engine.replay", "train": "pte.training.train", "evaluate_all": "pte.pipeline.evaluate",
    "score": "pte.data.rewards",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pte' has no attribute {name!r}")
