"""The thought encoder: evicted keys/values -> a fixed-size per-layer state S (paper Eq. 4; docs/method.md).

Per decoder layer l and sequence b the state is ``S[l, b] in R^{G x r}``:

* global tokens ``h_g`` (G x d_model, shared across layers by default) pass through the layer's frozen
  ``input_layernorm`` and frozen ``W_Q, W_K, W_V`` (no RoPE) giving ``q_g, k_g, v_g``;
* ``S_g = (q_g Wa_Q)(k_g Wa_K)^T (v_g Wa_V) / (sqrt(r) G)``                     (global state)
* ``S'_e = (q_g Wa_Q)(K_e Wa_K)^T (V_e Wa_V) / (sqrt(r) m)`` for m evicted tokens  (event state)
  with ``K_e`` un-rotated to pre-RoPE keys and KV heads flattened (``d_kv = H_kv * D``);
* ``S = Normalize(S_g + sum_e S'_e)`` (row-wise L2 over r); ``recursive`` uses ``S <- Normalize(S + S'_e)``.

How events enter the state is the write form (:mod:`pte.engine.writes`): the paper's linear sum of event terms, or
one of the project's extensions (``pte.extensions``: the softmax write, the context write; docs/method.md).

Evicted K/V enter detached. The state math runs in fp32 whatever the
model's dtype: the encoder's parameters are cast at use, because DeepSpeed's bf16 mode casts the whole module,
encoder included (``docs/method.md``, "Precision"). The pure functions below are the
math; :class:`ThoughtEncoder` holds the trainable parameters and :class:`ThoughtState` the per-batch
running state. This module knows nothing about caches or sampling; it only needs the model's layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pte.config import PTEConfig
from pte.engine.writes import Write, event_state, make_write, write_parameters

__all__ = [
    "SegmentState",
    "ThoughtEncoder",
    "ThoughtState",
    "event_state",
    "flatten_heads",
    "global_state",
    "normalize_rows",
    "unrotate_keys",
]


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo rotary embedding: the inverse of ``k * cos + rotate_half(k) * sin``.

    RoPE rotates each (i, i + D/2) pair by the angle of its position, an orthogonal map (times the
    rope type's ``attention_scaling`` s, present in cos and sin). Rotating back by the same angle and
    dividing by ``cos^2 + sin^2 = s^2`` recovers the pre-RoPE key exactly.

    Args:
        keys: ``[B, H, T, D]`` rotated keys.
        cos, sin: ``[B, T, D]`` from the model's rotary embedding at the keys' positions.

    Returns:
        ``[B, H, T, D]`` pre-RoPE keys.
    """
    cos, sin = cos.unsqueeze(1).to(keys.dtype), sin.unsqueeze(1).to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)  # rotate_half
    return (keys * cos - rotated * sin) / (cos * cos + sin * sin)


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D] -> [B, T, H*D]``, head-major: the layout of the ``k_proj``/``v_proj`` output."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def normalize_rows(s: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise L2 normalisation over the last (rank) dimension."""
    return s / s.norm(dim=-1, keepdim=True).clamp_min(eps)


def global_state(qa: torch.Tensor, ka: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
    """``S_g = qa ka^T va / (sqrt(r) G)``.

    Args:
        qa, ka, va: ``[..., G, r]`` projected global queries, keys and values.

    Returns:
        ``[..., G, r]``.
    """
    g, r = qa.shape[-2], qa.shape[-1]
    return qa @ (ka.transpose(-1, -2) @ va) / (math.sqrt(r) * g)


class ThoughtEncoder(nn.Module):
    """Trainable parameters of the thought state: global tokens and per-layer latent projections.

    Args:
        d_model: hidden size; d_q = H * D and d_kv = H_kv * D of the attention layers.
        num_layers: L decoder layers.
        cfg: G, per-layer globals, ablation switches.
        rank: r, the latent rank (= the adapter rank).
    """

    def __init__(self, d_model: int, d_q: int, d_kv: int, num_layers: int, cfg: PTEConfig, rank: int):
        super().__init__()
        self.cfg, self.rank, self.num_layers = cfg, rank, num_layers
        shape = (num_layers, cfg.global_tokens, d_model) if cfg.per_layer_globals else (cfg.global_tokens, d_model)
        # Global tokens go through RMSNorm before the frozen projections, so unit-scale init is in distribution.
        self.global_tokens = nn.Parameter(torch.randn(shape))
        self.wa_q = nn.Parameter(torch.randn(num_layers, d_q, rank) / math.sqrt(d_q))
        self.wa_k = nn.Parameter(torch.randn(num_layers, d_kv, rank) / math.sqrt(d_kv))
        self.wa_v = nn.Parameter(torch.randn(num_layers, d_kv, rank) / math.sqrt(d_kv))
        for name, value in write_parameters(cfg, num_layers, d_kv).items():  # the write form's (extensions only)
            self.register_parameter(name, nn.Parameter(value))

    def project_globals(self, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """Global queries and state through each layer's frozen norm and projections.

        Args:
            layers: the model's decoder layers (``input_layernorm`` and ``self_attn.{q,k,v}_proj`` frozen;
                adapter-wrapped projections are read through their ``base_layer``).

        Returns:
            ``qa`` ``[L, G, r]`` (fp32) and ``S_g`` ``[L, G, r]`` (fp32; zeros for the #Global-0 ablation).
        """
        qas, sgs = [], []
        for i, layer in enumerate(layers):
            h = self.global_tokens[i] if self.cfg.per_layer_globals else self.global_tokens
            attn = layer.self_attn
            x = layer.input_layernorm(h.to(layer.input_layernorm.weight.dtype).unsqueeze(0))[0]  # [G, d_model]
            q = _base(attn.q_proj)(x)
            k = _base(attn.k_proj)(x)
            v = _base(attn.v_proj)(x)
            q, k = _head_norm(attn, "q_norm", q), _head_norm(attn, "k_norm", k)
            qa = q.float() @ self.wa_q[i].float()
            qas.append(qa)
            if self.cfg.use_global_state:
                sgs.append(global_state(qa, k.float() @ self.wa_k[i].float(), v.float() @ self.wa_v[i].float()))
            else:
                sgs.append(torch.zeros_like(qa))
        return torch.stack(qas), torch.stack(sgs)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _head_norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply Qwen3-style per-head q_norm/k_norm so global projections live where the cached keys live."""
    norm = getattr(attn, name, None)
    if norm is None:
        return x
    g, d = x.shape[0], attn.head_dim
    return norm(x.view(g, -1, d)).reshape(g, -1)


class ThoughtState:
    """Running state of one batch while sampling: ``S = Normalize(S_g + W(events))`` per layer and row.

    Built at the start of a rollout or replay (``S_g`` and ``qa`` are recomputed from the current parameters,
    so gradients reach the encoder in training); :meth:`update` folds in one eviction event.

    Args:
        qa: ``[L, G, r]`` projected global queries.
        s_global: ``[L, G, r]`` global state.
        batch_size: B.
        cfg: normalisation mode and ablations.
        write: the write form (:func:`pte.engine.writes.make_write`), fresh for this batch.
    """

    def __init__(self, qa: torch.Tensor, s_global: torch.Tensor, batch_size: int, cfg: PTEConfig, write: Write):
        self.qa, self.cfg, self.write = qa, cfg, write
        base = s_global.unsqueeze(1).expand(-1, batch_size, -1, -1)  # [L, B, G, r] fp32, un-normalised
        write.start(qa, base)
        self.current = normalize_rows(base, cfg.eps)  # [L, B, G, r]
        self.num_updates = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """Fold one event into the state.

        Args:
            keys, values: ``[L, B, m, d_kv]`` the event's pre-RoPE evicted keys and values (detached, fp32).
            active: ``[B]`` bool; rows that already finished keep their state.
        """
        if not self.cfg.event_updates:
            return
        keep = active.view(1, -1, 1, 1).to(torch.float32)
        if self.cfg.normalize == "recursive":
            new = normalize_rows(self.current + self.write.event_term(self.qa, keys, values), self.cfg.eps)
            self.current = keep * new + (1 - keep) * self.current
        else:
            self.current = normalize_rows(self.write.add(keys, values, keep), self.cfg.eps)
        self.num_updates += 1


class SegmentState:
    """Replay-side state: S^(k) rebuilt from the current parameters for every segment.

    docs/method.md, "Replay and gradients".

    The paper's accumulate form is linear in the evicted K/V: ``sum_e qa Wa_K^T (K_e^T V_e / m) Wa_V / sqrt(r)``.
    Keeping the detached ``sum_e K_e^T V_e / m`` (``[L, B, d_kv, d_kv]``, constant in the sequence length) lets each
    segment build ``S^(k)`` in a fresh, tiny autograd graph, so segment-wise backward never has to retain an earlier
    graph and gradients still reach ``h_g`` and ``Wa_*`` through every event. The ``recursive`` form is not linear;
    there ``S^(k-1)`` enters detached (truncated backpropagation through the state chain). The extensions' write
    forms that are not linear in the parameters keep the last ``grad_horizon`` events with gradient
    (:mod:`pte.engine.writes`).

    Args:
        encoder: the thought encoder. layers: the model's decoder layers. batch_size: B. cfg: the PTE settings.
    """

    def __init__(self, encoder: ThoughtEncoder, layers, batch_size: int, cfg: PTEConfig):
        self.encoder, self.layers, self.batch_size, self.cfg = encoder, layers, batch_size, cfg
        self.write = make_write(encoder, cfg)
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # recursive: (K, V, keep), new event
        self.previous: torch.Tensor | None = None  # recursive: S^(k-1), detached
        self.current: torch.Tensor | None = None  # [L, B, G, r] the state in use

    def observe(self, keys: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """Record one event from pre-RoPE ``keys``/``values`` ``[L, B, m, d_kv]`` (rows not ``active`` are skipped)."""
        if not self.cfg.event_updates:
            return
        keys, values = keys.float(), values.float()
        keep = active.view(1, -1, 1, 1).float()
        if self.cfg.normalize == "recursive":
            self.previous = None if self.current is None else self.current.detach()
            self.last = (keys, values, keep)
        else:
            self.write.record(keys, values, keep)

    def build(self) -> torch.Tensor:
        """Compute the state of the coming segment from the parameters; returns (and stores) ``[L, B, G, r]``."""
        qa, s_global = self.encoder.project_globals(self.layers)
        base = s_global.unsqueeze(1).expand(-1, self.batch_size, -1, -1)
        if self.cfg.normalize == "recursive":
            if self.last is None:
                self.current = normalize_rows(base, self.cfg.eps)
                return self.current
            keys, values, keep = self.last
            prev = self.previous if self.previous is not None else normalize_rows(base, self.cfg.eps).detach()
            new = normalize_rows(prev + self.write.event_term(qa, keys, values), self.cfg.eps)
            self.current = keep * new + (1 - keep) * prev
            return self.current
        self.current = normalize_rows(self.write.rebuild(qa, base), self.cfg.eps)
        return self.current
