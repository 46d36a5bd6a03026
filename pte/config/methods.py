"""The method names, in one place that imports nothing: the config validates ``evaluate.methods`` and
``train.methods`` against them without pulling in torch, and ``pte.engine.adapters`` attaches one of them.

``base`` is the model without an adapter; ``lora`` a LoRA trained with the full cache, ``lora_c`` one trained under the
bounded cache; ``pte`` the thought encoder, with its ablations ``pte_global_only`` (no event updates) and
``pte_no_global`` (no global state) (docs/method.md, "Thought state and adapter").
"""

from __future__ import annotations

__all__ = ["METHODS", "PTE_METHODS"]

METHODS: tuple[str, ...] = ("base", "lora", "lora_c", "pte", "pte_global_only", "pte_no_global")
"""Every method the package can attach, train (all but ``base``) and evaluate."""

PTE_METHODS: tuple[str, ...] = ("pte", "pte_global_only", "pte_no_global")
"""The methods that attach the thought encoder (their adapters record the PTE form)."""
