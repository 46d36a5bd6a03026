"""Adapter invariants: a fresh adapter is the base model, training touches only adapter weights, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny

from pte.config import AdapterConfig, CacheConfig, PTEConfig, SamplingConfig
from pte.engine.adapters import (
    METHODS,
    adapter_state_dict,
    adapters_disabled,
    attach_adapter,
    find_pte,
    load_adapter,
    save_adapter,
)
from pte.engine.rollout import generate

ADAPTER = AdapterConfig(rank=8, alpha=16.0)
PTE = PTEConfig(global_tokens=4)


def _logits(model, tok):
    ids, am = batch(tok)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_gives_base_logits(family, method):
    model, tok = tiny(family)
    base = _logits(model, tok)
    model = attach_adapter(model, method, ADAPTER, PTE)
    assert torch.equal(_logits(model, tok), base)


def _dummy_step(model, tok, steps=1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, am = batch(tok)
    for _ in range(steps):
        pte = find_pte(model)
        if pte is not None:
            pte.begin(ids.shape[0])  # S = Norm(S_g) in the graph: gradients reach the encoder
        loss = model(input_ids=ids, attention_mask=am).logits.float().pow(2).mean()
        if pte is not None:
            pte.end()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["lora", "lora_c", "pte", "pte_global_only"])
def test_only_adapter_parameters_change(method):
    model, tok = tiny("qwen2-tiny")
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = attach_adapter(model, method, ADAPTER, PTE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(adapter_state_dict(model))
    _dummy_step(model, tok, steps=2)  # two steps: A is zero at first, so B only moves from the second on
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, sorted(trainable - changed)
    # base weights, under their adapter-wrapped names, are bit-identical
    for n, p in model.named_parameters():
        if n not in trainable:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_before[key]), n


@pytest.mark.parametrize("method", ["lora_c", "pte", "pte_global_only"])
def test_save_load_roundtrip_and_disable(tmp_path, method):
    model, tok = tiny("llama-tiny")
    base = _logits(model, tok)
    model = attach_adapter(model, method, ADAPTER, PTE)
    _dummy_step(model, tok, steps=2)
    trained = _logits(model, tok)
    assert not torch.allclose(trained, base)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, tok), base)
    assert torch.equal(_logits(model, tok), trained)
    out = save_adapter(model, tmp_path / "adapter", method, ADAPTER, PTE, base_model="random:llama-tiny")
    files = sorted(p.name for p in out.iterdir())
    assert "pte_adapter.json" in files and "adapter_model.safetensors" in files
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size < sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad) / 4  # adapter only

    fresh, tok2 = tiny("llama-tiny")
    loaded, loaded_method = load_adapter(fresh, out)
    assert loaded_method == method
    torch.testing.assert_close(_logits(loaded, tok2), trained, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def _trained_and_saved(tmp_path, method, pte_cfg):
    """A tiny model with ``method``'s adapter after one step, saved: ``(tokenizer, its logits, dir, parsed meta)``."""
    import json

    model, tok = tiny("llama-tiny")
    model = attach_adapter(model, method, ADAPTER, pte_cfg)
    _dummy_step(model, tok, steps=1)
    out = save_adapter(model, tmp_path / "adapter", method, ADAPTER, pte_cfg)
    return tok, _logits(model, tok), out, json.loads((out / "pte_adapter.json").read_text())


def test_adapter_records_its_form_and_one_saved_with_flat_extension_keys_still_loads(tmp_path):
    """The form is in the adapter's meta; an adapter saved before ``pte.extensions`` (its keys flat in ``pte``)
    loads with the same settings, and one trained with a removed setting fails naming the commit that had it."""
    import json

    from pte.config import PTEExtensions

    ext = PTEConfig(global_tokens=4, use_global_state=False,
                    extensions=PTEExtensions(write="softmax", write_context=2, grad_horizon=8))
    tok, trained, out, meta = _trained_and_saved(tmp_path, "pte", ext)
    assert meta["form"] == "paper+write=softmax,write_context=2,grad_horizon=8"
    flat = {k: v for k, v in meta["pte"].items() if k != "extensions"}  # the layout of older adapters
    flat.update(write="softmax", write_context=2, gate_horizon=8, write_gate=False, read="linear")
    (out / "pte_adapter.json").write_text(json.dumps({**meta, "pte": flat}))
    loaded, _ = load_adapter(tiny("llama-tiny")[0], out)
    assert find_pte(loaded).pte_cfg == ext
    torch.testing.assert_close(_logits(loaded, tok), trained, atol=1e-6, rtol=0)
    (out / "pte_adapter.json").write_text(json.dumps({**meta, "pte": {**flat, "read": "gated"}}))
    with pytest.raises(ValueError, match="removed pte.read.*9b921cb"):
        load_adapter(tiny("llama-tiny")[0], out)


def test_a_lora_adapter_whose_saved_pte_settings_name_a_removed_setting_still_loads(tmp_path):
    """``lora`` never reads ``pte``: its saved settings holding a removed setting (on) do not stop it loading."""
    import json

    tok, trained, out, meta = _trained_and_saved(tmp_path, "lora", PTE)
    (out / "pte_adapter.json").write_text(json.dumps({**meta, "pte": {**meta["pte"], "read": "gated"}}))
    loaded, method = load_adapter(tiny("llama-tiny")[0], out)
    assert method == "lora"
    torch.testing.assert_close(_logits(loaded, tok), trained, atol=1e-6, rtol=0)


def test_pte_rollout_uses_state_and_disable_restores_base():
    model, tok = tiny("llama-tiny")
    ids, am = batch(tok)
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.0)
    ref = generate(model, ids, am, CacheConfig(window=6), cfg, [tok.eos_token_id], tok.pad_token_id)
    attach_adapter(model, "pte", ADAPTER, PTE)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("pte_up"):
                p.normal_(0, 0.5)
    with adapters_disabled(model):
        same = generate(model, ids, am, CacheConfig(window=6), cfg, [tok.eos_token_id], tok.pad_token_id)
    assert torch.equal(same.tokens, ref.tokens)
    diff = generate(model, ids, am, CacheConfig(window=6), cfg, [tok.eos_token_id], tok.pad_token_id)
    assert not torch.equal(diff.tokens, ref.tokens)


def test_bad_targets_and_methods_are_clear():
    model, _ = tiny("llama-tiny")
    with pytest.raises(ValueError, match="target_modules"):
        attach_adapter(model, "pte", AdapterConfig(target_modules=("nope_proj",)), PTE)
    with pytest.raises(ValueError, match="method = 'pte2' is unknown"):
        attach_adapter(model, "pte2", ADAPTER, PTE)
    with pytest.raises(FileNotFoundError, match="not a pte adapter directory"):
        load_adapter(model, "/nonexistent")
