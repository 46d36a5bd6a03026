"""Training: ``grpo`` (the loss math of the paper's Eq. 3), ``objectives`` (the per-chunk losses of ``grpo``, ``sft``
and ``distill``), ``train`` (the cache-aware loop on a DeepSpeed engine), ``runtime`` (device, precision, seeding,
DeepSpeed), ``checkpoint`` (atomic, resumable), ``warmstart`` (supervised warm start of the base),
``sensitivity`` (the frozen base's eviction sensitivity of the weighted ``sft`` steps, computed once for every
method). Built on ``pte.engine``.
"""
