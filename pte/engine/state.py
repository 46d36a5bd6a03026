"""The thought encoder: evicted keys/values -> a fixed-size per-layer state S (paper Eq. 4; docs/method.md).

Per decoder layer l and sequence b the state is ``S[l, b] in R^{G x r}``:

* global tokens ``h_g`` (G x d_model, shared across layers by default) pass through the layer's frozen
  ``input_layernorm`` and frozen ``W_Q, W_K, W_V`` (no RoPE) giving ``q_g, k_g, v_g``;
* ``S_g = (q_g Wa_Q)(k_g Wa_K)^T (v_g Wa_V) / (sqrt(r) G)``                     (global state)
* ``S'_e = (q_g Wa_Q)(K_e Wa_K)^T (V_e Wa_V) / (sqrt(r) m)`` for m evicted tokens  (event state)
  with ``K_e`` un-rotated to pre-RoPE keys and KV heads flattened (``d_kv = H_kv * D``);
* ``S = Normalize(S_g + sum_e S'_e)`` (row-wise L2 over r); ``recursive`` uses ``S <- Normalize(S + S'_e)``;
* with ``pte.write_gate`` (not the paper) each evicted token's term is scaled by a learned gate
  ``beta_t = sigmoid(w_l . [k_t; v_t] + b_l)``: ``S'_e = (q_g Wa_Q)(diag(beta) K_e Wa_K)^T (V_e Wa_V) / (sqrt(r) m)``;
* with ``pte.write_context = c > 1`` (not the paper) the evicted keys and values are first mixed by a learned causal
  depthwise convolution over the evicted sequence, ``k~_t = sum_j w^K_{l,j} * k_{t-j}`` (j < c, likewise v), the
  last c - 1 tokens of the previous event carried over (:func:`context_mix`);
* with ``pte.write = softmax`` (not the paper) the event terms are replaced by softmax attention pooling of the
  global queries over every token evicted so far, ``P = softmax_t((q_g Wa_Q)(k_t Wa_K)^T / sqrt(r)) (V Wa_V)``, kept
  exactly across events as a running (max, sum, weighted sum) (:func:`pool_event`, :func:`merge_pools`), and
  ``S = Normalize(S_g + P)``.

The paper's form is linear (no softmax). Evicted K/V enter detached. The state math runs in fp32 whatever the
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

__all__ = [
    "ThoughtEncoder",
    "ThoughtState",
    "context_mix",
    "event_state",
    "flatten_heads",
    "global_state",
    "merge_pools",
    "normalize_rows",
    "pool_event",
    "pooled",
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


def event_state(qa: torch.Tensor, ke: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
    """``S'_e = qa (ke^T ve) / (sqrt(r) m)``, computed through the r x r product (cheap for any m).

    Args:
        qa: ``[L, G, r]`` projected global queries.
        ke, ve: ``[L, B, m, r]`` projected evicted keys and values.

    Returns:
        ``[L, B, G, r]``.
    """
    m, r = ke.shape[-2], ke.shape[-1]
    kv = ke.transpose(-1, -2) @ ve  # [L, B, r, r]
    return qa.unsqueeze(1) @ kv / (math.sqrt(r) * m)


def context_mix(x: torch.Tensor, carry: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution of one event's evicted tokens, continuing the evicted sequence.

    Args:
        x: ``[L, B, m, d]`` the event's pre-RoPE keys (or values), oldest first.
        carry: ``[L, B, c - 1, d]`` the last c - 1 tokens evicted before them (zeros before the first event).
        kernel: ``[L, c, d]`` taps; tap j weighs the token j places back (tap 0 = the token itself).

    Returns:
        ``[L, B, m, d]``: ``out_t = sum_j kernel[:, j] * x_{t-j}`` over the concatenated sequence, so mixing event by
        event with the carry equals mixing all evicted tokens at once.
    """
    c, m = kernel.shape[1], x.shape[-2]
    seq = torch.cat([carry, x], dim=-2)  # [L, B, c - 1 + m, d]
    return sum(kernel[:, None, j, None, :] * seq[..., c - 1 - j:c - 1 - j + m, :] for j in range(c))


Pool = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Softmax-pool statistics ``(max [.., G, 1], sum [.., G, 1], weighted sum [.., G, r])`` over the tokens seen."""


def pool_event(qa: torch.Tensor, ke: torch.Tensor, ve: torch.Tensor) -> Pool:
    """Softmax-pool statistics of one event: scores ``s = qa ke^T / sqrt(r)`` per global query and token.

    Args:
        qa: ``[L, G, r]`` projected global queries.
        ke, ve: ``[L, B, m, r]`` projected evicted keys and values.

    Returns:
        ``(mx, z, n)``: ``mx = max_t s`` ``[L, B, G, 1]`` (detached: the pooled state does not depend on it),
        ``z = sum_t exp(s - mx)`` ``[L, B, G, 1]`` and ``n = sum_t exp(s - mx) ve_t`` ``[L, B, G, r]``.
    """
    scores = qa.unsqueeze(1) @ ke.transpose(-1, -2) / math.sqrt(qa.shape[-1])  # [L, B, G, m]
    mx = scores.detach().amax(-1, keepdim=True)
    w = torch.exp(scores - mx)
    return mx, w.sum(-1, keepdim=True), w @ ve


def merge_pools(old: Pool | None, new: Pool, keep: torch.Tensor) -> Pool:
    """Pool statistics over the tokens of both (the online softmax); rows with ``keep`` 0 keep ``old``.

    ``old`` None = nothing pooled yet (an empty pool: max -inf, sums 0). ``keep``: ``[1, B, 1, 1]`` 0/1.
    """
    if old is None:
        old = (torch.full_like(new[0], torch.finfo(new[0].dtype).min), torch.zeros_like(new[1]),
               torch.zeros_like(new[2]))
    mx = torch.maximum(old[0], new[0])
    a, b = torch.exp(old[0] - mx), torch.exp(new[0] - mx)
    merged = (mx, old[1] * a + new[1] * b, old[2] * a + new[2] * b)
    keep = keep.bool()
    return tuple(torch.where(keep, m, o) for m, o in zip(merged, old, strict=True))  # type: ignore[return-value]


def pooled(pool: Pool) -> torch.Tensor:
    """The pooled values ``n / z`` ``[L, B, G, r]`` (zeros for rows that pooled nothing)."""
    return pool[2] / pool[1].clamp_min(torch.finfo(pool[1].dtype).tiny)


def context_carry(x: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """The carry after an event: the last ``c - 1`` tokens of ``carry`` followed by ``x`` (``[L, B, c - 1, d]``)."""
    return torch.cat([carry, x], dim=-2)[..., x.shape[-2]:, :] if carry.shape[-2] else carry


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
        if cfg.write_gate:  # zeros: every gate starts at 1/2, the paper's form up to the scale of the event terms
            self.gate_w = nn.Parameter(torch.zeros(num_layers, 2 * d_kv))
            self.gate_b = nn.Parameter(torch.zeros(num_layers))
        if cfg.write_context > 1:  # the identity: tap 0 = 1, so a fresh adapter writes each token alone (the paper)
            ident = torch.zeros(num_layers, cfg.write_context, d_kv)
            ident[:, 0] = 1.0
            self.context_k = nn.Parameter(ident.clone())
            self.context_v = nn.Parameter(ident)

    def carries(self, keys: torch.Tensor, values: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The context write's carry (last ``c - 1`` raw evicted keys and values, ``[L, B, c - 1, d_kv]`` each)
        before and after the event ``keys``/``values`` ``[L, B, m, d_kv]``; ``carry`` None = before the first event
        (zeros)."""
        if carry is None:
            shape = (*keys.shape[:2], self.cfg.write_context - 1, keys.shape[-1])
            carry = (keys.new_zeros(shape, dtype=torch.float32), keys.new_zeros(shape, dtype=torch.float32))
        return carry, (context_carry(keys, carry[0]), context_carry(values, carry[1]))

    def mix(self, keys: torch.Tensor, values: torch.Tensor, carry_k: torch.Tensor,
            carry_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context write: ``[L, B, m, d_kv]`` pre-RoPE keys and values mixed with their ``c - 1`` predecessors
        (:func:`context_mix`; fp32). Without ``write_context`` (c = 1) they are returned as they are."""
        if self.cfg.write_context == 1:
            return keys, values
        return (context_mix(keys.float(), carry_k, self.context_k.float()),
                context_mix(values.float(), carry_v, self.context_v.float()))

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

    def gates(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write gates ``beta = sigmoid(w_l . [k; v] + b_l)`` of evicted tokens.

        ``[L, B, m, d_kv]`` pre-RoPE keys and values -> ``[L, B, m]`` (fp32); ones when ``write_gate`` is off.
        """
        if not self.cfg.write_gate:
            return torch.ones(keys.shape[:-1], device=keys.device)
        d = keys.shape[-1]
        w, b = self.gate_w.float(), self.gate_b.float()
        logits = keys.float() @ w[:, None, :d, None] + values.float() @ w[:, None, d:, None]  # [L, B, m, 1]
        return torch.sigmoid(logits[..., 0] + b[:, None, None])

    def project_evicted(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L, B, m, d_kv]`` pre-RoPE keys / values -> ``[L, B, m, r]`` each (fp32); keys carry the write gates."""
        ke = keys.float() @ self.wa_k.float().unsqueeze(1)
        if self.cfg.write_gate:
            ke = ke * self.gates(keys, values).unsqueeze(-1)
        return ke, values.float() @ self.wa_v.float().unsqueeze(1)


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
    """Running state of one batch: ``S = Normalize(S_g + S_acc)`` per layer and row.

    Built at the start of a rollout or replay (``S_g`` and ``qa`` are recomputed from the current parameters,
    so gradients reach the encoder in training); :meth:`update` folds in one eviction event.

    Args:
        qa: ``[L, G, r]`` projected global queries.
        s_global: ``[L, G, r]`` global state.
        batch_size: B.
        cfg: normalisation mode and ablations.
    """

    def __init__(self, qa: torch.Tensor, s_global: torch.Tensor, batch_size: int, cfg: PTEConfig):
        self.qa, self.cfg = qa, cfg
        self.acc = s_global.unsqueeze(1).expand(-1, batch_size, -1, -1)  # [L, B, G, r] fp32, un-normalised
        self.current = normalize_rows(self.acc, cfg.eps)  # [L, B, G, r]
        self.num_updates = 0
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # write_context: last c - 1 raw evicted K, V
        self.pool: Pool | None = None  # write = softmax: the pooled events

    def update(self, ke: torch.Tensor, ve: torch.Tensor, active: torch.Tensor) -> None:
        """Fold one event into the state.

        Args:
            ke, ve: ``[L, B, m, r]`` projected evicted keys / values (from detached K/V).
            active: ``[B]`` bool; rows that already finished keep their state.
        """
        if not self.cfg.event_updates:
            return
        keep = active.view(1, -1, 1, 1).to(torch.float32)
        if self.cfg.write == "softmax":  # acc stays S_g; the pool holds the events
            self.pool = merge_pools(self.pool, pool_event(self.qa, ke, ve), keep)
            self.current = normalize_rows(self.acc + pooled(self.pool), self.cfg.eps)
        elif self.cfg.normalize == "recursive":
            new = normalize_rows(self.current + event_state(self.qa, ke, ve), self.cfg.eps)  # [L, B, G, r]
            self.current = keep * new + (1 - keep) * self.current
        else:
            self.acc = self.acc + keep * event_state(self.qa, ke, ve)
            self.current = normalize_rows(self.acc, self.cfg.eps)
        self.num_updates += 1


class SegmentState:
    """Replay-side state: S^(k) rebuilt from the current parameters for every segment.

    docs/method.md, "Replay and gradients".

    The accumulate form is linear in the evicted K/V: ``sum_e qa Wa_K^T (K_e^T V_e / m) Wa_V / sqrt(r)``. Keeping
    the detached ``sum_e K_e^T V_e / m`` (``[L, B, d_kv, d_kv]``, constant in the sequence length) lets each segment
    build ``S^(k)`` in a fresh, tiny autograd graph, so segment-wise backward never has to retain an earlier graph
    and gradients still reach ``h_g`` and ``Wa_*`` through every event. The ``recursive`` form is not linear; there
    ``S^(k-1)`` enters detached (truncated backpropagation through the state chain). With ``write_gate`` or
    ``write_context`` the sum is no longer linear in the parameters: the last ``gate_horizon`` events keep their raw
    K/V (and the carry before them) and are recomputed with gradient in every segment, older ones are folded into
    the detached sum with the gates and mixing they had. ``write = softmax`` likewise keeps the last ``gate_horizon``
    events with gradient and folds older ones detached into a running pool (:func:`merge_pools`; exact values, the
    parameters do not change within a replay).

    Args:
        encoder: the thought encoder. layers: the model's decoder layers. batch_size: B. cfg: the PTE settings.
    """

    def __init__(self, encoder: ThoughtEncoder, layers, batch_size: int, cfg: PTEConfig):
        self.encoder, self.layers, self.batch_size, self.cfg = encoder, layers, batch_size, cfg
        self.kv_sum: torch.Tensor | None = None  # [L, B, d_kv, d_kv] fp32, detached
        # write_gate / write_context: (K, V, keep, carry K, carry V) per event, raw K/V with the carry before it
        self.recent: list[tuple[torch.Tensor, ...]] = []
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # write_context: last c - 1 raw evicted K, V
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # recursive: (K, V, keep), new event
        self.previous: torch.Tensor | None = None  # recursive: S^(k-1), detached
        self.current: torch.Tensor | None = None  # [L, B, G, r] the state in use
        self.pool: Pool | None = None  # write = softmax: events older than the horizon, detached

    def observe(self, keys: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """Record one event from pre-RoPE ``keys``/``values`` ``[L, B, m, d_kv]`` (rows not ``active`` are skipped)."""
        if not self.cfg.event_updates:
            return
        keys, values = keys.float(), values.float()
        keep = active.view(1, -1, 1, 1).float()
        if self.cfg.normalize == "recursive":
            self.previous = None if self.current is None else self.current.detach()
            self.last = (keys, values, keep)
        elif self.cfg.write_gate or self.cfg.write_context > 1 or self.cfg.write == "softmax":
            before, self.carry = self.encoder.carries(keys, values, self.carry)
            self.recent.append((keys, values, keep, *before))
            if len(self.recent) > self.cfg.gate_horizon and self.cfg.write == "linear":  # softmax: in build()
                with torch.no_grad():
                    self._fold(self._kv(*self._mixed(self.recent.pop(0))))
        else:
            self._fold(self._kv(keys, values, keep))

    def _mixed(self, event: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A recorded event's ``(K, V, keep)`` after the context write (the identity when ``write_context`` is 1)."""
        keys, values, keep, carry_k, carry_v = event
        return (*self.encoder.mix(keys, values, carry_k, carry_v), keep)

    def _kv(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep * (diag(beta) K)^T V / m`` of one event: ``[L, B, d_kv, d_kv]`` (beta = 1 without a write gate)."""
        if self.cfg.write_gate:
            keys = keys * self.encoder.gates(keys, values).unsqueeze(-1)
        return keep * (keys.transpose(-1, -2) @ values) / keys.shape[-2]

    def _fold(self, kv: torch.Tensor) -> None:
        self.kv_sum = kv if self.kv_sum is None else self.kv_sum + kv

    def _events_term(self, qa: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``qa Wa_K^T kv Wa_V / sqrt(r)`` for a (sum of) ``[L, B, d_kv, d_kv]`` event products: ``[L, B, G, r]``."""
        wa_k, wa_v = self.encoder.wa_k.float().unsqueeze(1), self.encoder.wa_v.float().unsqueeze(1)  # [L, 1, d_kv, r]
        return qa.unsqueeze(1) @ (wa_k.transpose(-1, -2) @ kv @ wa_v) / math.sqrt(qa.shape[-1])

    def _event_term(self, qa: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
        """One event's term from its K/V, projected to rank r first (gates included): ``[L, B, G, r]``."""
        ke, ve = self.encoder.project_evicted(keys, values)  # [L, B, m, r]
        return keep * event_state(qa, ke, ve)

    def build(self) -> torch.Tensor:
        """Compute the state of the coming segment from the parameters; returns (and stores) ``[L, B, G, r]``."""
        qa, s_global = self.encoder.project_globals(self.layers)
        base = s_global.unsqueeze(1).expand(-1, self.batch_size, -1, -1)
        if self.cfg.normalize == "recursive" and self.last is not None:
            keys, values, keep = self.last
            prev = self.previous if self.previous is not None else normalize_rows(base, self.cfg.eps).detach()
            new = normalize_rows(prev + self._event_term(qa, keys, values, torch.ones_like(keep)), self.cfg.eps)
            self.current = keep * new + (1 - keep) * prev
            return self.current
        if self.cfg.write == "softmax":
            return self._build_pooled(qa, base)
        terms = [] if self.kv_sum is None else [self._events_term(qa, self.kv_sum)]
        terms += [self._event_term(qa, *self._mixed(e)) for e in self.recent]  # recent events, with gradient
        if self.cfg.normalize == "recursive" or not terms:
            self.current = normalize_rows(base, self.cfg.eps)
        else:
            self.current = normalize_rows(base + sum(terms), self.cfg.eps)
        return self.current

    def _pool(self, qa: torch.Tensor, pool: Pool | None, event: tuple[torch.Tensor, ...]) -> Pool:
        keys, values, keep = self._mixed(event)
        return merge_pools(pool, pool_event(qa, *self.encoder.project_evicted(keys, values)), keep)

    def _build_pooled(self, qa: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``write = softmax``: fold events beyond the horizon into the detached pool, pool the recent ones on top."""
        while len(self.recent) > self.cfg.gate_horizon:
            with torch.no_grad():
                self.pool = self._pool(qa.detach(), self.pool, self.recent.pop(0))
        pool = self.pool
        for event in self.recent:
            pool = self._pool(qa, pool, event)
        self.current = normalize_rows(base if pool is None else base + pooled(pool), self.cfg.eps)
        return self.current
