"""Bounded KV cache: a fixed prompt block plus a thinking window with chunked eviction (docs/method.md).

Every row of a batch has the same slot layout ``[prompt block: P slots][thinking window: <= W slots]``.
Prompts are left-padded to P; pad slots are masked and never evicted. When appending would push the
window past W, the oldest ``e = ceil(evict_ratio * W)`` thinking slots are removed at once (an eviction
*event*). Rows decode in lockstep, so events happen at the same step for every row and the schedule
depends only on (W, e): the window fills after W tokens and then every e tokens.

Positions are absolute: each slot remembers the RoPE position it was rotated with, and new tokens
continue at their true index (``prompt_len_b + t``), never at the (shrunken) cache length.
Attention masks are built here as explicit 4-D masks over the slots, so padding stays correct after
any eviction; HF receives them as-is.

The HF ``DynamicCache`` does the appending inside the attention layers; this module only removes
slots from it. With ``static=True`` (a bounded window) every layer instead holds one preallocated
``[B, H_kv, P + W, D]`` buffer (:class:`SlotLayer`): the attention layers write new K/V in place at the next
free slot, an eviction shifts the kept thinking slots down by ``e`` in place, and the unused tail is masked, so a
decode step allocates and copies no cache (a ``DynamicCache`` concatenates the whole cache every step). Slot order
is the same in both, so the logits agree to rounding (attention also sums over the masked tail). It knows nothing
about sampling, adapters or the thought state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from pte.config import CacheConfig

__all__ = ["BoundedCache", "CachePlan", "Evicted", "SlotLayer", "event_steps", "plan_cache", "slot_attention_mask"]


@dataclass(frozen=True)
class CachePlan:
    """The resolved cache layout of one batch."""

    prompt_len: int  # P: padded prompt block
    window: int | None  # W: thinking slots (None = unbounded, full cache)
    evict: int  # e: thinking tokens removed per event (0 when unbounded)

    @property
    def capacity(self) -> int | None:
        """Total slots P + W (None = unbounded)."""
        return None if self.window is None else self.prompt_len + self.window


def plan_cache(cfg: CacheConfig, prompt_len: int) -> CachePlan:
    """Resolve ``cfg`` for a batch whose padded prompt block has ``prompt_len`` tokens."""
    window = cfg.thinking_window(prompt_len)
    if window is None:
        return CachePlan(prompt_len, None, 0)
    return CachePlan(prompt_len, window, cfg.evict_count(window))


def event_steps(plan: CachePlan, num_fed: int) -> list[int]:
    """Indices j of generated tokens before whose append an eviction event happens.

    Feeding generated tokens ``0 .. num_fed-1`` one at a time into a window of W slots evicts before
    token W, W+e, W+2e, ... . This is the pure schedule that rollout and replay share.
    """
    if plan.window is None:
        return []
    return list(range(plan.window, num_fed, plan.evict))


def slot_attention_mask(key_valid: torch.Tensor, num_new: int) -> torch.Tensor:
    """Boolean attention mask for ``num_new`` new tokens appended after the existing slots.

    Args:
        key_valid: ``[B, S]`` bool, the validity of every slot *including* the ``num_new`` new ones at the end.
        num_new: number of query tokens (the last ``num_new`` slots).

    Returns:
        ``[B, 1, num_new, S]`` bool (True = attend): each query sees every valid earlier slot and the new slots
        up to itself (causal inside the chunk). A query always sees itself, so padded queries never produce
        NaNs whose K/V would then poison the cache.
    """
    bsz, total = key_valid.shape
    past = total - num_new
    q = torch.arange(num_new, device=key_valid.device).unsqueeze(1) + past  # [q, 1] slot index of each query
    k = torch.arange(total, device=key_valid.device).unsqueeze(0)  # [1, S]
    causal = k <= q  # [q, S]
    mask = causal.unsqueeze(0) & key_valid.unsqueeze(1)  # [B, q, S]
    mask = mask | (k == q).unsqueeze(0)
    return mask.unsqueeze(1)


@dataclass
class Evicted:
    """Keys/values removed by one eviction event."""

    keys: list[torch.Tensor]  # L x [B, H_kv, e, D], post-RoPE (as cached)
    values: list[torch.Tensor]  # L x [B, H_kv, e, D]
    positions: torch.Tensor  # [B, e] RoPE position each evicted key was rotated with


class SlotLayer(CacheLayerMixin):
    """One layer's preallocated ``[B, H_kv, P + W, D]`` keys and values, written in place at the owner's next slot.

    The attention layers call ``update`` with the new tokens' K/V ``[B or U, H_kv, n, D]``; they are copied into the
    slots ``owner.write_index`` (``[n]`` long) and the whole buffer is returned: the owner's mask hides the slots not
    in use. The index is a tensor, not a Python int, so a compiled decode step sees the same graph at every step
    (an int would be specialised and recompiled per slot). A shared prefill passes its U < B distinct rows, written
    to rows ``0..U-1`` and spread by :meth:`BoundedCache.broadcast_rows`.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: BoundedCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        bsz, heads, cap = self.owner.batch_size, key_states.shape[1], self.owner.plan.capacity
        self.keys = key_states.new_zeros(bsz, heads, cap, key_states.shape[-1])
        self.values = value_states.new_zeros(bsz, heads, cap, value_states.shape[-1])
        torch._dynamo.mark_static_address(self.keys)  # updated in place: CUDA graphs may keep their addresses
        torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, index = key_states.shape[0], self.owner.write_index
        keys, values = self.keys[:rows], self.values[:rows]
        keys.index_copy_(2, index, key_states)  # a shared prefill writes (and attends with) its own rows only
        values.index_copy_(2, index, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.plan.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner.num_slots

    def get_max_length(self) -> int:
        return self.owner.plan.capacity


class BoundedCache:
    """Slot bookkeeping around an HF ``DynamicCache`` (or the in-place :class:`SlotLayer` buffers) for one batch.

    Args:
        plan: the resolved layout.
        prompt_mask: ``[B, P]`` 1 for real prompt tokens, 0 for left padding.
        static: preallocate ``P + W`` slots per layer and write, evict and mask in place (needs a bounded window;
            ignored for the full cache). Its masks then always span the ``P + W`` slots and must always be passed.
    """

    def __init__(self, plan: CachePlan, prompt_mask: torch.Tensor, static: bool = False):
        bsz, p = prompt_mask.shape
        assert p == plan.prompt_len, (p, plan.prompt_len)
        self.plan = plan
        self.batch_size = bsz
        self.static = static and plan.window is not None
        self._write_indices: dict[int, torch.Tensor] = {}  # static: one [n] slot index per forward width n
        self.write_index: torch.Tensor | None = None  # static: [n] long, the slots the next forward's n tokens go to
        # static: one SlotLayer per decoder layer, created when the layer first writes
        self.hf = Cache(layer_class_to_replicate=lambda: SlotLayer(self)) if self.static else DynamicCache()
        self.prompt_lengths = prompt_mask.sum(-1).long()  # [B]
        self._valid = prompt_mask.bool()  # [B, S] for the slots described so far
        # HF convention for left padding: real tokens at positions 0..len-1, pads at 1 (masked anyway).
        self._pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)  # [B, S]
        self.num_thinking = 0
        self.num_events = 0
        self.max_slots = 0

    @property
    def prompt_positions(self) -> torch.Tensor:
        """``[B, P]`` RoPE positions of the prompt block."""
        return self._pos[:, : self.plan.prompt_len]

    @property
    def num_slots(self) -> int:
        return self._valid.shape[1]

    def positions_for(self, gen_index: torch.Tensor | int, count: int) -> torch.Tensor:
        """``[B, count]`` absolute positions of generated tokens ``gen_index .. gen_index+count-1``."""
        offs = torch.arange(count, device=self._pos.device) + gen_index
        return self.prompt_lengths.unsqueeze(1) + offs.unsqueeze(0)

    def needs_eviction(self, num_new: int) -> bool:
        """Whether appending ``num_new`` thinking tokens requires an eviction event first."""
        return self.plan.window is not None and self.num_thinking + num_new > self.plan.window

    def extend(self, positions: torch.Tensor) -> torch.Tensor:
        """Describe ``positions.shape[1]`` new thinking slots (the model appends their K/V) and return their mask.

        Args:
            positions: ``[B, n]`` absolute positions of the new tokens.

        Returns:
            ``[B, 1, n, S]`` bool attention mask for the forward that appends them.
        """
        n = positions.shape[1]
        if self.plan.window is not None and self.num_thinking + n > self.plan.window:
            raise RuntimeError(f"appending {n} tokens overflows the thinking window "
                               f"({self.num_thinking}/{self.plan.window}); evict first")
        self._point_writes(self.num_slots, n)
        self._valid = torch.cat([self._valid, self._valid.new_ones(self._valid.shape[0], n)], dim=1)
        self._pos = torch.cat([self._pos, positions.to(self._pos)], dim=1)
        self.num_thinking += n
        self.max_slots = max(self.max_slots, self.num_slots)
        return self._full_width(slot_attention_mask(self._valid, n))

    def _point_writes(self, start: int, n: int) -> None:
        """Aim ``write_index`` at slots ``start .. start + n - 1``: a tensor kept per width ``n`` and overwritten in
        place, so a compiled (CUDA-graph) step reads the new slots from the same address."""
        if not self.static:
            return
        index = self._write_indices.get(n)
        if index is None:
            index = self._write_indices[n] = torch.empty(n, dtype=torch.long, device=self._valid.device)
            torch._dynamo.mark_static_address(index)
        torch.arange(start, start + n, out=index)
        self.write_index = index

    def prefill_mask(self) -> torch.Tensor:
        """``[B, 1, P, P]`` attention mask of the prompt-block forward (``[B, 1, P, P + W]`` when static)."""
        self._point_writes(0, self.plan.prompt_len)
        self.max_slots = max(self.max_slots, self.num_slots)
        return self._full_width(slot_attention_mask(self._valid, self.plan.prompt_len))

    def _full_width(self, mask: torch.Tensor) -> torch.Tensor:
        """A static cache's attention sees all ``P + W`` slots: the ones not in use are hidden."""
        if not self.static:
            return mask
        return F.pad(mask, (0, self.plan.capacity - mask.shape[-1]), value=False)

    def broadcast_rows(self, index: torch.Tensor) -> None:
        """Spread a prefill computed for some rows to the whole batch: row b of every layer gets row ``index[b]``.

        Args:
            index: ``[B]`` long, the computed row that row b copies (rows sharing a prompt share one prefill).
        """
        for layer in self.hf.layers:
            if self.static:  # only the slots written so far (the prompt block) hold anything
                s = self.num_slots
                layer.keys[:, :, :s].copy_(layer.keys[:, :, :s].index_select(0, index))
                layer.values[:, :, :s].copy_(layer.values[:, :, :s].index_select(0, index))
            else:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)

    def evict(self) -> Evicted:
        """Remove the oldest ``e`` thinking slots from every layer and return what left."""
        p, e = self.plan.prompt_len, min(self.plan.evict, self.num_thinking)
        assert e > 0, "nothing to evict"
        keys, values = [], []
        for layer in self.hf.layers:
            k, v = layer.keys, layer.values
            if self.static:
                keys.append(k[:, :, p : p + e].clone())  # the shift below overwrites these slots
                values.append(v[:, :, p : p + e].clone())
                _shift_down(k, p + e, p + self.num_thinking, e)
                _shift_down(v, p + e, p + self.num_thinking, e)
                continue
            keys.append(k[:, :, p : p + e])
            values.append(v[:, :, p : p + e])
            layer.keys = torch.cat([k[:, :, :p], k[:, :, p + e :]], dim=2)
            layer.values = torch.cat([v[:, :, :p], v[:, :, p + e :]], dim=2)
        positions = self._pos[:, p : p + e]
        self._valid = torch.cat([self._valid[:, :p], self._valid[:, p + e :]], dim=1)
        self._pos = torch.cat([self._pos[:, :p], self._pos[:, p + e :]], dim=1)
        self.num_thinking -= e
        self.num_events += 1
        return Evicted(keys, values, positions)


def _shift_down(buf: torch.Tensor, start: int, end: int, by: int) -> None:
    """Move slots ``[start, end)`` of ``buf`` ``[B, H, S, D]`` to ``[start - by, end - by)`` in place.

    Blocks of at most ``by`` slots, lowest first: a block's source and destination never overlap (torch refuses
    overlapping in-place copies), and a source is read before any later block overwrites it. Slots left behind at the
    top keep stale values; the mask hides them until they are written again.
    """
    for a in range(start, end, by):
        b = min(a + by, end)
        buf[:, :, a - by : b - by].copy_(buf[:, :, a:b])
