"""pte: Progressive Thought Encoding — GRPO training of reasoning LLMs under a bounded KV cache.

Shape letters used in docstrings across the package:

* ``B`` rows of a batch (prompts x group samples), ``P`` padded prompt block, ``T`` generated tokens,
* ``W`` thinking-window slots, ``e`` / ``m`` tokens evicted per event, ``S`` cache slots (``P`` + kept thinking),
* ``L`` decoder layers, ``H`` / ``H_kv`` query / key-value heads, ``D`` head dim, ``d_kv = H_kv * D``,
* ``G`` global tokens (rows of the thought state), ``r`` adapter / latent rank, ``V`` vocabulary.

The public API is re-exported lazily (importing ``pte`` does not import torch):
``load_params`` and the config dataclasses, ``load_model``, ``generate`` / ``Generator``, the adapter verbs,
``train`` and ``evaluate_all``.

Module map (the method decisions: docs/method.md; the pipeline seams: docs/pipeline.md):

* engine: ``models`` (base model + tokenizer from a source string), ``cache`` (prompt block + thinking window,
  chunked eviction), ``state`` (evicted K/V -> thought state S), ``adapters`` (PTE adapter, peft LoRA baselines),
  ``methods`` (method names), ``rollout`` (sampling under the bounded cache), ``replay`` (log-probs under the
  rollout's eviction schedule), ``inference`` (text in, text out: chat template, batching, decoding);
* training: ``grpo`` (advantages, PPO-clip, KL, loss aggregation), ``objectives`` (``sft``, ``distill``), ``train``
  (the cache-aware loop), ``runtime`` (device, precision, seeding, DeepSpeed), ``checkpoint`` (atomic, resumable),
  ``warmstart`` (supervised warm start of the base);
* data: ``sources`` (problem sources -> rows), ``tasks`` (``var_chain``, worked solutions), ``data`` (splits, JSONL,
  prompts, chat messages), ``rewards`` (answer extraction, equivalence oracle);
* pipeline: ``config`` (``Params``, ``load_params``) with ``config_engine``, ``config_training``,
  ``config_pipeline`` and ``schema`` (parsing helpers), ``stages`` (DVC stage entry points), ``cli`` (the ``pte``
  command), ``evaluate`` (every method under every budget), ``plots``, ``tracking`` (MLflow, JSON lines, offline
  sync), ``registry`` and ``registry_model`` (registered model, predictor), ``mechanism`` and ``study`` (research
  instruments).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_params": "pte.config", "Params": "pte.config", "CacheConfig": "pte.config", "SamplingConfig": "pte.config",
    "AdapterConfig": "pte.config", "PTEConfig": "pte.config", "GRPOConfig": "pte.config", "TrainConfig": "pte.config",
    "load_model": "pte.models", "generate": "pte.rollout", "Rollout": "pte.rollout", "Generator": "pte.inference",
    "attach_adapter": "pte.adapters", "save_adapter": "pte.adapters", "load_adapter": "pte.adapters",
    "adapters_disabled": "pte.adapters", "replay_logprobs": "pte.replay", "train": "pte.train",
    "evaluate_all": "pte.evaluate", "score": "pte.rewards",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pte' has no attribute {name!r}")
