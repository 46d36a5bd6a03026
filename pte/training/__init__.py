"""Training: ``grpo`` (the loss math of the paper's Eq. 3), ``objectives`` (the per-chunk losses of ``grpo``, ``sft``
and ``distill``), ``train`` (the cache-aware loop on a DeepSpeed engine), ``runtime`` (device, precision, seeding,
DeepSpeed), ``checkpoint`` (atomic, resumable), ``warmstart`` (supervised warm start of the base). Built on
``pte.engine``; knows nothing of the DVC stages.
"""
