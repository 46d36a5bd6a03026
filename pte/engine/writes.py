"""How eviction events are written into the thought state: one strategy per write form, chosen once per batch.

The state is ``S = Normalize(S_g + W(events))`` (:mod:`pte.engine.state`, the paper's Eq. 4-6); a :class:`Write`
is the ``W``, kept two ways:

* while sampling (:class:`pte.engine.state.ThoughtState`), exactly and event by event: :meth:`Write.start`, then
  :meth:`Write.add` per event, each returning the un-normalised state;
* while replaying (:class:`pte.engine.state.SegmentState`), rebuilt from the current parameters for every segment so
  gradients reach the encoder: :meth:`Write.record` per event, :meth:`Write.rebuild` per segment.

The forms (docs/method.md):

* :class:`LinearWrite`: the paper's event term ``S'_e = (q_g Wa_Q)(K_e Wa_K)^T (V_e Wa_V) / (sqrt(r) m)``, summed over
  events. It is linear in the evicted K/V, so the replay keeps only the detached ``sum_e K_e^T V_e / m``.
  The extension ``pte.extensions.write_context`` (not the paper: a learned causal convolution over the evicted
  sequence, :func:`context_mix`) makes the sum non-linear in the parameters: the replay then keeps the last
  ``grad_horizon`` events' raw K/V with gradient and folds older ones in detached.
* :class:`SoftmaxWrite` (not the paper): softmax attention pooling of the global queries over every token evicted so
  far, ``P = softmax_t((q_g Wa_Q)(k_t Wa_K)^T / sqrt(r)) (V Wa_V)``, kept exactly across events as a running
  (max, sum, weighted sum) (:func:`pool_event`, :func:`merge_pools`); ``write_context`` applies to it too.

All of it runs in fp32. The pure functions are the math; the classes only keep the running statistics.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING

import torch

from pte.config import PTEConfig

if TYPE_CHECKING:
    from pte.engine.state import ThoughtEncoder

__all__ = ["LinearWrite", "Pool", "SoftmaxWrite", "Write", "context_carry", "context_mix", "event_state",
           "make_write", "merge_pools", "pool_event", "pooled", "write_parameters"]


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


def context_carry(x: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """The carry after an event: the last ``c - 1`` tokens of ``carry`` followed by ``x`` (``[L, B, c - 1, d]``)."""
    return torch.cat([carry, x], dim=-2)[..., x.shape[-2]:, :] if carry.shape[-2] else carry


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


def write_parameters(cfg: PTEConfig, num_layers: int, d_kv: int) -> dict[str, torch.Tensor]:
    """The extensions' parameters at their initial values (registered on the encoder under these names):
    ``context_k`` and ``context_v`` ``[L, c, d_kv]`` with ``write_context`` c > 1 (the identity, tap 0 = 1: a fresh
    adapter writes each token alone, the paper's form)."""
    params = {}
    c = cfg.extensions.write_context
    if c > 1:
        ident = torch.zeros(num_layers, c, d_kv)
        ident[:, 0] = 1.0
        params.update(context_k=ident.clone(), context_v=ident)
    return params


Event = tuple[torch.Tensor, ...]
"""A recorded event: raw pre-RoPE ``(K, V, keep)`` and, with ``write_context``, the carry ``(K, V)`` before it."""


class Write(abc.ABC):
    """The events' part of the state for one batch (a base class: :func:`make_write` picks the form).

    Args:
        encoder: the thought encoder (its projections, and the context parameters of the extension).
        cfg: the PTE settings.

    Tensors: ``keys``/``values`` are one event's raw pre-RoPE evicted keys and values ``[L, B, m, d_kv]`` (fp32,
    detached); ``keep`` ``[1, B, 1, 1]`` is 0 for rows that already finished (they keep their state); ``qa``
    ``[L, G, r]`` the projected global queries; ``base`` ``[L, B, G, r]`` the global state ``S_g`` per row.
    """

    def __init__(self, encoder: ThoughtEncoder, cfg: PTEConfig):
        self.encoder, self.cfg, self.ext = encoder, cfg, cfg.extensions
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # write_context: last c - 1 raw evicted K, V
        self.recent: list[Event] = []  # the replay's events with gradient (the extensions)
        self.qa: torch.Tensor | None = None

    def project(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling: the context write (``write_context``: continues the evicted sequence across events, advancing
        the carry), then the projections to rank r (:meth:`project_evicted`): ``[L, B, m, r]`` each."""
        if self.ext.write_context > 1:
            before = self._advance(keys, values)
            keys, values = self.mix(keys, values, *before)
        return self.project_evicted(keys, values)

    def project_evicted(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K_e Wa_K`` and ``V_e Wa_V``: ``[L, B, m, d_kv]`` -> ``[L, B, m, r]`` each (fp32)."""
        return (keys.float() @ self.encoder.wa_k.float().unsqueeze(1),
                values.float() @ self.encoder.wa_v.float().unsqueeze(1))

    def event_term(self, qa: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One event's linear term ``S'_e`` ``[L, B, G, r]``, with gradient: the recursive form's."""
        return event_state(qa, *self.project_evicted(keys, values))

    def mix(self, keys: torch.Tensor, values: torch.Tensor, carry_k: torch.Tensor,
            carry_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context write: ``[L, B, m, d_kv]`` keys and values mixed with their ``c - 1`` predecessors
        (:func:`context_mix`; fp32); the identity when ``write_context`` is 1."""
        if self.ext.write_context == 1:
            return keys, values
        return (context_mix(keys.float(), carry_k, self.encoder.context_k.float()),
                context_mix(values.float(), carry_v, self.encoder.context_v.float()))

    def _advance(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The carry (last ``c - 1`` raw evicted keys and values, ``[L, B, c - 1, d_kv]`` each, zeros before the first
        event) before the event ``keys``/``values``; the stored carry moves past it."""
        if self.carry is None:
            shape = (*keys.shape[:2], self.ext.write_context - 1, keys.shape[-1])
            self.carry = (keys.new_zeros(shape, dtype=torch.float32), keys.new_zeros(shape, dtype=torch.float32))
        before = self.carry
        self.carry = (context_carry(keys, before[0]), context_carry(values, before[1]))
        return before

    def remember(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Replay: keep the event's raw K/V (and the carry before it) for recomputation with gradient."""
        self.recent.append((keys, values, keep, *self._advance(keys, values)))

    def mixed(self, event: Event) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A recorded event's ``(K, V, keep)`` after the context write (the identity when ``write_context`` is 1)."""
        keys, values, keep, carry_k, carry_v = event
        return (*self.mix(keys, values, carry_k, carry_v), keep)

    @abc.abstractmethod
    def start(self, qa: torch.Tensor, base: torch.Tensor) -> None:
        """Sampling: begin a batch with no events."""

    @abc.abstractmethod
    def add(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Sampling: fold one event in exactly; returns the un-normalised state ``[L, B, G, r]``."""

    @abc.abstractmethod
    def record(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Replay: record one event."""

    @abc.abstractmethod
    def rebuild(self, qa: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Replay: the un-normalised state of the coming segment from the current parameters ``[L, B, G, r]``."""


class LinearWrite(Write):
    """The paper's sum of event terms (with the context extension when it is set)."""

    def __init__(self, encoder: ThoughtEncoder, cfg: PTEConfig):
        super().__init__(encoder, cfg)
        self.acc: torch.Tensor | None = None  # sampling: S_g + the events so far
        self.kv_sum: torch.Tensor | None = None  # replay: [L, B, d_kv, d_kv], detached
        self.exact = cfg.extensions.exact  # linear in the parameters: fold every event

    def start(self, qa: torch.Tensor, base: torch.Tensor) -> None:
        self.qa, self.acc = qa, base

    def add(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.acc = self.acc + keep * event_state(self.qa, *self.project(keys, values))
        return self.acc

    def record(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        if self.exact:
            self._fold(self._kv(keys, values, keep))
            return
        self.remember(keys, values, keep)
        if len(self.recent) > self.ext.grad_horizon:  # older events: detached, with the mixing they had
            with torch.no_grad():
                self._fold(self._kv(*self.mixed(self.recent.pop(0))))

    def rebuild(self, qa: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        terms = [] if self.kv_sum is None else [self._events_term(qa, self.kv_sum)]
        terms += [self._event_term(qa, *self.mixed(e)) for e in self.recent]  # recent events, with gradient
        return base + sum(terms) if terms else base

    def _kv(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep * K^T V / m`` of one event: ``[L, B, d_kv, d_kv]``."""
        return keep * (keys.transpose(-1, -2) @ values) / keys.shape[-2]

    def _fold(self, kv: torch.Tensor) -> None:
        self.kv_sum = kv if self.kv_sum is None else self.kv_sum + kv

    def _events_term(self, qa: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``qa Wa_K^T kv Wa_V / sqrt(r)`` for a (sum of) ``[L, B, d_kv, d_kv]`` event products: ``[L, B, G, r]``."""
        wa_k, wa_v = self.encoder.wa_k.float().unsqueeze(1), self.encoder.wa_v.float().unsqueeze(1)  # [L, 1, d_kv, r]
        return qa.unsqueeze(1) @ (wa_k.transpose(-1, -2) @ kv @ wa_v) / math.sqrt(qa.shape[-1])

    def _event_term(self, qa: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
        """One event's term from its K/V, projected to rank r first: ``[L, B, G, r]``."""
        return keep * self.event_term(qa, keys, values)


class SoftmaxWrite(Write):
    """Softmax pooling of every evicted token (not the paper; docs/method.md, "Softmax write")."""

    def __init__(self, encoder: ThoughtEncoder, cfg: PTEConfig):
        super().__init__(encoder, cfg)
        self.base: torch.Tensor | None = None
        self.pool: Pool | None = None  # sampling: every event; replay: the events older than the horizon, detached

    def start(self, qa: torch.Tensor, base: torch.Tensor) -> None:
        self.qa, self.base = qa, base

    def add(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.pool = merge_pools(self.pool, pool_event(self.qa, *self.project(keys, values)), keep)
        return self.base + pooled(self.pool)

    def record(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        self.remember(keys, values, keep)  # folded in rebuild(), which has the queries

    def rebuild(self, qa: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Fold events beyond the horizon into the detached pool, pool the recent ones on top (exact values: the
        parameters do not change within a replay)."""
        while len(self.recent) > self.ext.grad_horizon:
            with torch.no_grad():
                self.pool = self._pool(qa.detach(), self.pool, self.recent.pop(0))
        pool = self.pool
        for event in self.recent:
            pool = self._pool(qa, pool, event)
        return base if pool is None else base + pooled(pool)

    def _pool(self, qa: torch.Tensor, pool: Pool | None, event: Event) -> Pool:
        keys, values, keep = self.mixed(event)
        return merge_pools(pool, pool_event(qa, *self.project_evicted(keys, values)), keep)


def make_write(encoder: ThoughtEncoder, cfg: PTEConfig) -> Write:
    """The write form of ``cfg.extensions.write``: ``linear`` (the paper's) or ``softmax``."""
    return SoftmaxWrite(encoder, cfg) if cfg.extensions.write == "softmax" else LinearWrite(encoder, cfg)
