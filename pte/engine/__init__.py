"""The engine: the bounded cache, the thought state and everything that runs a model under them.

``models`` (base model + tokenizer from a source string), ``cache`` (prompt block + thinking window, chunked
eviction), ``state`` (evicted K/V -> thought state S, the paper's Eq. 4-6), ``writes`` (how an
event enters S: the paper's linear write and the project's extensions), ``adapters`` (the PTE adapter, peft LoRA
baselines), ``rollout`` (sampling under the bounded cache), ``replay`` (log-probs under the rollout's eviction
schedule, segment by segment), ``inference`` (text in, text out). It imports ``pte.config`` and ``pte.data`` (prompts),
never ``pte.training`` or ``pte.pipeline`` (tests/test_layout.py).
"""
