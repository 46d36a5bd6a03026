"""Text in, text out under the bounded cache: model (+ adapter) loading, chat templating, batching, decoding.

The one entry point that ``pte generate``, evaluation and the MLflow predictor share. It knows nothing
about training or tracking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pte.config import CacheConfig, SamplingConfig
from pte.data.rows import prompt_messages
from pte.engine.adapters import load_adapter, read_adapter_meta
from pte.engine.models import load_model
from pte.engine.rollout import Rollout, generate

__all__ = ["Generator", "completion_ids", "decode_completion", "encode_prompts", "eos_ids"]


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a row: the tokenizer's EOS plus the generation config's (a list for chat models)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def encode_prompts(tokenizer, prompts: list[str], raw: bool = False, device: str | torch.device = "cpu",
                   system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template (unless ``raw`` or the tokenizer has no template) and left-pad a batch of prompts.

    Args:
        prompts: user messages. system: optional system message placed before each.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``[B, P]``.
    """
    if not raw and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(prompt_messages(p, system), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        add_special = False  # the template already holds every special token
    else:
        texts, add_special = list(prompts), True
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_ids(out: Rollout) -> list[list[int]]:
    """The generated token ids of every row of ``out`` (``tokens`` ``[B, T]`` where ``mask`` is set), EOS included."""
    return [out.tokens[b][out.mask[b].bool()].tolist() for b in range(out.tokens.shape[0])]


def decode_completion(tokenizer, token_ids: list[int], eos: list[int] | set[int]) -> str:
    """The text of one completion: ``token_ids`` without a trailing EOS (any of ``eos``, see :func:`eos_ids`),
    decoded without special tokens. The one decoder of completions: rewards in training, the evaluation and
    ``pte generate`` / the predictor all score and show the same text."""
    ids = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Generator:
    """A loaded policy (base model, optionally with its adapter) ready to generate."""

    model: Any
    tokenizer: Any
    method: str = "base"

    @classmethod
    def load(cls, model: str | None, adapter: str | None = None, dtype: str = "float32",
             device: str | torch.device = "cpu") -> Generator:
        """Load ``model`` (default: the base model recorded in the adapter) and attach ``adapter`` if given."""
        if model is None:
            if adapter is None:
                raise ValueError("pass --model (and optionally --adapter), or an --adapter that records its base model")
            model = read_adapter_meta(adapter).get("base_model")
            if not model:
                raise ValueError(f"adapter {adapter!r} does not record its base model; pass --model")
        net, tok = load_model(model, dtype=dtype, device=device)
        method = "base"
        if adapter is not None:
            net, method = load_adapter(net, adapter)
        return cls(net, tok, method)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def rollout(self, prompts: list[str], cache: CacheConfig, sampling: SamplingConfig, seed: int = 0,
                raw: bool = False, progress: bool = False, system: str | None = None) -> Rollout:
        """Generate for a batch of prompt texts (``system``: optional system message, as in :func:`encode_prompts`);
        returns the raw :class:`Rollout`."""
        ids, mask = encode_prompts(self.tokenizer, prompts, raw=raw, device=self.device, system=system)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return generate(self.model, ids, mask, cache, sampling, eos_ids(self.model, self.tokenizer),
                        self.tokenizer.pad_token_id, generator=gen, progress=progress)

    def __call__(self, prompts: list[str], cache: CacheConfig, sampling: SamplingConfig, seed: int = 0,
                 raw: bool = False, progress: bool = False, system: str | None = None) -> list[dict[str, Any]]:
        """Generate and decode: one dict per prompt with ``text``, ``token_ids``, ``num_evictions``,
        ``max_cache_tokens``, ``finished``."""
        out = self.rollout(prompts, cache, sampling, seed=seed, raw=raw, progress=progress, system=system)
        eos = set(eos_ids(self.model, self.tokenizer))
        results = []
        for b, ids in enumerate(completion_ids(out)):
            results.append({"text": decode_completion(self.tokenizer, ids, eos), "token_ids": ids,
                            "num_evictions": int(out.num_evictions[b]), "max_cache_tokens": out.max_cache_tokens,
                            "finished": bool(out.finished[b])})
        return results
