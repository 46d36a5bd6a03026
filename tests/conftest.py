"""Shared fixtures: offline environment, tiny random models (Llama, Qwen2, Qwen3 with GQA), prompts."""

from __future__ import annotations

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("llama-tiny", "qwen2-tiny", "qwen3-tiny")
PROMPTS = ["hello world, how are you", "2+2=", "a much longer prompt with many more bytes in it"]


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def tiny(family: str, seed: int = 1):
    from pte.engine.models import load_model

    model, tok = load_model(f"random:{family}", seed=seed)
    tok.padding_side = "left"
    return model, tok


def batch(tok, prompts=PROMPTS):
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and they stall badly on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
