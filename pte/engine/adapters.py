"""Adapters: the state-conditioned PTE adapter and the plain peft LoRA baselines.

docs/method.md, "Thought state and adapter".

PTE adds to every target linear ``y = W x + (alpha/r) * A (S^l (B x))`` where ``B in R^{r x d_in}``
(Kaiming, the paper's input-side factor, here ``pte_down``), ``A in R^{d_out x G}`` (zeros, the paper's
output-side factor, here ``pte_up``) and ``S^l in R^{G x r}`` is the layer's thought state for each row.
A fresh adapter therefore *is* the base model. S differs per row, so the update is a batched matmul,
never a merged weight. The LoRA baselines (``lora``: trained with a full cache, ``lora_c``: with the
bounded cache) use peft's ``LoraConfig`` with the same rank, alpha and target modules.

Both kinds save and load as an adapter directory (config JSON + safetensors, adapter weights only) and
can be switched off for the reference policy (:func:`adapters_disabled`), so no second model copy exists.
This module knows nothing about sampling or training; rollouts talk to :class:`PTEAdapter` through
``begin`` / ``observe_eviction`` / ``end``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pte.config import AdapterConfig, PTEConfig, section_from_dict
from pte.config.methods import METHODS, PTE_METHODS
from pte.engine.cache import Evicted
from pte.engine.state import (
    SegmentState,
    ThoughtEncoder,
    ThoughtState,
    flatten_heads,
    normalize_rows,
    unrotate_keys,
)
from pte.engine.writes import make_write

__all__ = [
    "METHODS",
    "PTEAdapter",
    "StateLoRALinear",
    "adapter_state_dict",
    "adapters_disabled",
    "attach_adapter",
    "find_pte",
    "load_adapter",
    "load_adapter_weights",
    "method_pte_config",
    "save_adapter",
    "sort_peft_sets",
    "trains_with_bounded_cache",
]

ADAPTER_META = "pte_adapter.json"
WEIGHTS = "adapter_model.safetensors"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method = {method!r} is unknown; allowed: {', '.join(METHODS)}.")


def method_pte_config(method: str, cfg: PTEConfig) -> PTEConfig:
    """The PTE settings of a method: the ablations switch off event updates or the global state."""
    _check_method(method)
    return cfg.for_method(method)


def trains_with_bounded_cache(method: str) -> bool:
    """``lora`` trains with the full cache; every other trained method under the bounded cache."""
    _check_method(method)
    return method != "lora"


class StateBank:
    """Shared between a model's PTE modules: the state in use and the on/off switch (not an nn.Module)."""

    def __init__(self):
        # the batch's state: a ThoughtState while sampling, a SegmentState while replaying (both expose `current`)
        self.state: ThoughtState | SegmentState | None = None
        self.enabled = True


class StateLoRALinear(nn.Module):
    """A frozen linear plus the PTE update ``(alpha/r) * A (S (B x))`` for its layer's state S (paper Eq. 2-3).

    Args:
        base_layer: the frozen ``nn.Linear``.
        rank: r. global_tokens: G. scaling: alpha / r.
        layer_idx: decoder layer whose state this module reads.
        adapter: the owning :class:`PTEAdapter` (for the state and the static state outside rollouts).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, global_tokens: int, scaling: float, layer_idx: int,
                 adapter: PTEAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        self.pte_down = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.pte_down, a=math.sqrt(5))
        self.pte_up = nn.Parameter(torch.zeros(self.out_features, global_tokens, dtype=w.dtype, device=w.device))
        self.scaling, self.layer_idx = scaling, layer_idx
        object.__setattr__(self, "_adapter", adapter)  # a plain reference: not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        s = self._adapter.layer_state(self.layer_idx)  # [B or 1, G, r] or None when disabled
        if s is None:
            return y
        h = F.linear(x, self.pte_down)  # [B, T, r]
        h = h @ s.transpose(-1, -2).to(h.dtype)  # [B, T, G]
        return y + self.scaling * F.linear(h, self.pte_up)  # [B, T, out]


class PTEAdapter(nn.Module):
    """The PTE part of a model: the encoder, registered as ``model.pte_adapter``, plus the runtime state.

    ``begin(batch)`` computes ``S = Norm(S_g)`` from the current parameters (in the autograd graph when grad is
    enabled), ``observe_eviction`` folds an eviction event into it, ``end`` drops it.
    """

    def __init__(self, model: nn.Module, adapter_cfg: AdapterConfig, pte_cfg: PTEConfig):
        super().__init__()
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.adapter_cfg, self.pte_cfg = adapter_cfg, pte_cfg
        self.encoder = ThoughtEncoder(cfg.hidden_size, cfg.num_attention_heads * head_dim,
                                      cfg.num_key_value_heads * head_dim, cfg.num_hidden_layers, pte_cfg,
                                      adapter_cfg.rank)
        object.__setattr__(self, "_model", model)
        self.bank = StateBank()

    def _layers(self):
        return self._model.get_decoder().layers

    def begin(self, batch_size: int) -> ThoughtState:
        """Start a batch: the state before any event is ``Normalize(S_g)`` for every row."""
        qa, s_global = self.encoder.project_globals(self._layers())
        self.bank.state = ThoughtState(qa, s_global, batch_size, self.pte_cfg, make_write(self.encoder, self.pte_cfg))
        return self.bank.state

    def observe_eviction(self, evicted: Evicted, active: torch.Tensor) -> None:
        """Fold one eviction event into the state (keys un-rotated with their positions, heads flattened)."""
        state = self.bank.state
        assert state is not None, "begin() must be called before observe_eviction()"
        if not self.pte_cfg.event_updates:
            return
        state.update(*self.pre_rope(evicted), active)

    def pre_rope(self, evicted: Evicted) -> tuple[torch.Tensor, torch.Tensor]:
        """Evicted keys un-rotated to pre-RoPE and values, heads flattened, detached: ``[L, B, m, d_kv]`` each (fp32).

        The inverse rotation runs in fp32 (the rotary tables come in the dtype of the tensor passed), so a bf16 model's
        cached keys lose no further precision on their way into the fp32 state.
        """
        rotary = self._model.get_decoder().rotary_emb
        cos, sin = rotary(evicted.values[0].float(), position_ids=evicted.positions)
        keys = torch.stack([flatten_heads(unrotate_keys(k.detach().float(), cos, sin)) for k in evicted.keys])
        values = torch.stack([flatten_heads(v.detach().float()) for v in evicted.values])
        return keys, values

    def end(self) -> None:
        self.bank.state = None

    def layer_state(self, layer_idx: int) -> torch.Tensor | None:
        if not self.bank.enabled:
            return None
        if self.bank.state is not None:
            return self.bank.state.current[layer_idx]
        # Outside a rollout (a plain forward), the adapter is the static one of "before any event".
        qa, s_global = self.encoder.project_globals(self._layers()[layer_idx : layer_idx + 1])
        return normalize_rows(s_global, self.pte_cfg.eps)


def inject_pte(model: nn.Module, adapter_cfg: AdapterConfig, pte_cfg: PTEConfig) -> PTEAdapter:
    """Wrap the target linears of every decoder layer with :class:`StateLoRALinear`; mark only PTE trainable."""
    if find_pte(model) is not None:
        raise ValueError("this model already has a PTE adapter")
    pte = PTEAdapter(model, adapter_cfg, pte_cfg)
    targets = [(idx, parent, name)
               for idx, layer in enumerate(model.get_decoder().layers)
               for parent in layer.modules()
               for name in adapter_cfg.target_modules
               if isinstance(getattr(parent, name, None), nn.Linear)]
    for idx, parent, name in targets:
        setattr(parent, name, StateLoRALinear(getattr(parent, name), adapter_cfg.rank, pte_cfg.global_tokens,
                                              adapter_cfg.scaling, idx, pte))
    found = {name for _, _, name in targets}
    missing = set(adapter_cfg.target_modules) - found
    if missing:
        raise ValueError(f"adapter.target_modules: {sorted(missing)} not found as linear layers in the decoder; "
                         "use names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.")
    pte.to(device=model.device)
    model.add_module("pte_adapter", pte)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(n))
    return pte


def find_pte(model: nn.Module) -> PTEAdapter | None:
    """The model's :class:`PTEAdapter`, or None (base model or peft LoRA)."""
    for m in model.modules():
        if isinstance(m, PTEAdapter):
            return m
    return None


def _is_adapter_param(name: str) -> bool:
    return ".pte_down" in name or ".pte_up" in name or "pte_adapter." in name or "lora_" in name


def attach_adapter(model: nn.Module, method: str, adapter_cfg: AdapterConfig, pte_cfg: PTEConfig) -> nn.Module:
    """Return ``model`` with the adapter of ``method`` attached (``base``: unchanged, nothing trainable).

    ``lora``/``lora_c`` return a ``peft.PeftModel``; PTE methods modify ``model`` in place.
    """
    _check_method(method)
    if method == "base":
        return model
    if method in ("lora", "lora_c"):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=adapter_cfg.rank, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                          target_modules=list(adapter_cfg.target_modules), task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)
    inject_pte(model, adapter_cfg, method_pte_config(method, pte_cfg))
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base (the reference policy): PTE and peft adapters are bypassed."""
    pte = find_pte(model)
    if pte is not None:
        before, pte.bank.enabled = pte.bank.enabled, False
        try:
            yield
        finally:
            pte.bank.enabled = before
    elif hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield
    else:
        yield


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only (PTE encoder and up/down matrices, or peft ``lora_*``), keyed by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if _is_adapter_param(n)}


def save_adapter(model: nn.Module, out_dir: str | Path, method: str, adapter_cfg: AdapterConfig,
                 pte_cfg: PTEConfig, base_model: str | None = None) -> Path:
    """Write the adapter directory: ``pte_adapter.json`` (method, configs, base model) + weights (safetensors)."""
    from safetensors.torch import save_file

    _check_method(method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "base_model": base_model, "adapter": dataclasses.asdict(adapter_cfg),
            "pte": dataclasses.asdict(pte_cfg)}
    if method in PTE_METHODS:  # the paper's form or which extensions: readable without parsing the settings
        meta["form"] = pte_cfg.form()
    meta["adapter"]["target_modules"] = list(adapter_cfg.target_modules)
    if method in ("lora", "lora_c"):
        model.save_pretrained(out)  # peft: adapter_config.json + adapter_model.safetensors
        sort_peft_sets(out)
    elif method != "base":
        tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, str(out / WEIGHTS))
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def sort_peft_sets(adapter_dir: str | Path) -> None:
    """Sort ``adapter_config.json``'s lists that peft writes from sets in hash order (new in every process), so the
    adapter is the same bytes on every run (its hash is in ``dvc.lock``, docs/pipeline.md); no file: nothing to do."""
    path = Path(adapter_dir) / "adapter_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        cfg.update({k: sorted(cfg[k]) for k in ("target_modules", "exclude_modules") if isinstance(cfg.get(k), list)})
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))  # peft's own layout


def _copy_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / WEIGHTS), device=str(model.device))
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"adapter weights in {adapter_dir!s} do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; was it saved for another base model or method?")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in tensors.items():
            params[k].copy_(v)


def load_adapter_weights(model: nn.Module, method: str, adapter_dir: str | Path) -> None:
    """Copy the weights of a saved adapter of the same ``method`` into ``model``'s freshly attached adapter (a warm
    start, e.g. GRPO from an ``sft`` adapter); trainability is left as it is."""
    meta = read_adapter_meta(adapter_dir)
    if meta["method"] != method:
        raise ValueError(f"train.init_adapter = {str(adapter_dir)!r} holds a {meta['method']!r} adapter, not "
                         f"{method!r}; point it at models/{method}/adapter of an earlier run.")
    if method in ("lora", "lora_c"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / WEIGHTS), device=str(model.device)))
    elif method != "base":
        _copy_weights(model, adapter_dir)


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """The ``pte_adapter.json`` of an adapter directory (with a clear error when it is not one)."""
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir!s} is not a pte adapter directory (no {ADAPTER_META}); pass a "
                                "directory written by the train stage or save_adapter().")
    return json.loads(path.read_text())


def upgrade_pte_meta(pte: dict, adapter_dir: str | Path, method: str) -> dict:
    """The ``pte`` settings of an adapter's meta in today's layout: an adapter saved with the flat extension keys
    (before ``pte.extensions``: :data:`pte.config.schema.MOVED_KEYS`) loads as it was trained.

    Raises:
        ValueError: a PTE adapter trained with a removed setting (:data:`pte.config.schema.REMOVED_KEYS`, on): its
            weights need the code of that time (the commit is named). A LoRA adapter never read them: they are
            dropped.
    """
    from pte.config.schema import LAST_COMMIT_WITH_REMOVED, MOVED_KEYS, REMOVED_KEYS

    pte = dict(pte)
    used = [k for k, (_, off) in REMOVED_KEYS.items() if pte.pop(k.split(".", 1)[1], off) != off]
    if used and method in PTE_METHODS:
        raise ValueError(f"the adapter in {adapter_dir!s} was trained with the removed {used[0]} (refuted: "
                         f"research/log.md); load it with the code of commit {LAST_COMMIT_WITH_REMOVED}.")
    prefix = "pte.extensions."
    flat = {new[len(prefix):]: pte.pop(old[len("pte."):]) for old, new in MOVED_KEYS.items()
            if new.startswith(prefix) and old[len("pte."):] in pte}
    if flat:
        pte["extensions"] = {**flat, **pte.get("extensions", {})}
    return pte


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> tuple[nn.Module, str]:
    """Attach the adapter saved in ``adapter_dir`` to the base ``model``; returns ``(model, method)``."""
    meta = read_adapter_meta(adapter_dir)
    method = meta["method"]
    adapter_cfg = section_from_dict(AdapterConfig, meta["adapter"], "adapter")
    pte_cfg = section_from_dict(PTEConfig, upgrade_pte_meta(meta["pte"], adapter_dir, method), "pte")
    if method in ("lora", "lora_c"):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_dir)), method
    model = attach_adapter(model, method, adapter_cfg, pte_cfg)
    if method != "base":
        _copy_weights(model, adapter_dir)
    model.requires_grad_(False)
    return model, method
