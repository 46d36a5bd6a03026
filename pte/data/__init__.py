"""Data, a leaf beside the engine: ``sources`` (problem sources -> rows), ``tasks`` (``var_chain``, worked solutions),
``rows`` (splits, JSONL, prompts, chat messages, the ``data:`` section), ``rewards`` (answer extraction, the one
equivalence oracle of reward and evaluation). It never imports the engine, training or the pipeline
(tests/test_layout.py).
"""
