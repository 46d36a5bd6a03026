"""The ``warmstart`` stage: supervised fine-tuning of the base on worked solutions, saved as a new base model.

GRPO needs a policy that already solves some problems in the expected format (the paper starts from models that
reason). A 135M instruct model does not, so the CPU demo first fine-tunes it on solutions written by program
(:func:`pte.data.tasks.worked_solution`) for the problems of ``data.warmstart`` (disjoint from the train and eval
problems, see ``pte.data.rows``), in the model's own chat format, ending with ``\\boxed{answer}``.

It is full fine-tuning with TRL's ``SFTTrainer`` (loss on the completion tokens only, AdamW, linear warm-up then
cosine decay). The result is a plain HF directory that every later stage uses as "the base". On CPU, with the same
thread count, a rerun writes byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pte.config import WarmstartConfig
from pte.data.rows import DataConfig, Row, chat_messages
from pte.data.tasks import worked_solutions

__all__ = ["DISABLED_MARKER", "resolve_base", "sft_examples", "warmstart", "write_disabled"]

log = logging.getLogger(__name__)

DISABLED_MARKER = "warmstart.json"
"""The file a disabled ``warmstart`` stage writes instead of a model; later stages then use the base as it is."""


def sft_examples(rows: Sequence[Row], data_cfg: DataConfig) -> list[dict[str, list[dict[str, str]]]]:
    """Conversational prompt/completion examples: the problem as the pipeline phrases it, the worked solution.

    Raises:
        ValueError: a row's source has no worked-solution writer (the message names the sources that have one).
    """
    solutions = worked_solutions(rows, "warmstart", "`data.warmstart` may list only var_chain and "
                                 "reasoning_gym:chain_sum sources.")
    return [{"prompt": chat_messages(row.problem, data_cfg), "completion": [{"role": "assistant", "content": s}]}
            for row, s in zip(rows, solutions, strict=True)]


def resolve_base(base: str | Path | None, warm: str | Path | None) -> str | None:
    """The model later stages start from: the warm-started one when its stage produced a model, else ``base``."""
    if warm is not None and (Path(warm) / "config.json").is_file():
        return str(warm)
    if warm is not None and not (Path(warm) / DISABLED_MARKER).is_file():
        raise FileNotFoundError(f"warm-start directory {str(warm)!r} holds neither a model nor {DISABLED_MARKER}; "
                                "run the warmstart stage first (dvc repro warmstart).")
    return None if base is None else str(base)


def warmstart(base: str | Path, rows: Sequence[Row], cfg: WarmstartConfig, data_cfg: DataConfig,
              out_dir: str | Path, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the model ``base`` (an HF directory or any ``model.source``) on worked solutions of ``rows``;
    write the result to ``out_dir``.

    The directory is replaced atomically (written next to it, then renamed), so a killed run leaves either the old
    directory or none, never half a model.

    Returns:
        Deterministic metrics: ``examples``, ``steps``, ``epochs``, ``loss_first``/``loss_last`` (training loss
        of the first and last logging step) and ``token_accuracy_last``; plus ``seconds`` and ``history`` (the
        per-step log), which callers keep out of DVC's compared metrics.
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pte.engine.models import load_model, save_hf

    if not rows:
        raise ValueError("warmstart: no problems to fine-tune on (data/warmstart.jsonl is empty); list sources in "
                         "`data.warmstart` or set warmstart.enabled: false.")
    examples = sft_examples(rows, data_cfg)
    # full fine-tuning keeps fp32 weights whatever model.dtype says: the optimizer updates them directly, and on
    # CUDA the trainer's bf16 autocast (below) gives the speed of bf16
    model, tok = load_model(str(base), dtype="float32", seed=seed)
    model.requires_grad_(True).train()  # load_model hands out a frozen model in eval mode
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    cuda = torch.cuda.is_available()
    try:
        args = SFTConfig(
            output_dir=str(work / "trainer"), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup,
            weight_decay=cfg.weight_decay, max_length=cfg.max_length, seed=seed, data_seed=seed,
            use_cpu=not cuda, save_strategy="no", report_to="none", logging_steps=1,
            disable_tqdm=not progress, dataloader_num_workers=0, completion_only_loss=True,
            # TRL turns bf16 autocast and activation checkpointing on by default: on a CPU without bf16 units that
            # emulates every matmul (measured ~10x slower here), and checkpointing buys nothing for a 135M model
            bf16=cuda and torch.cuda.is_bf16_supported(), fp16=False, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        history = [{k: v for k, v in rec.items() if k in ("step", "loss", "mean_token_accuracy", "learning_rate")}
                   for rec in trainer.state.log_history if "loss" in rec]
        model = trainer.model
        model.config.use_cache = True  # the trainer turns the KV cache off for training; generation wants it
        staged = work / "model"
        save_hf(model, tok, staged)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = (history[0], history[-1]) if history else ({}, {})
    log.info("warmstart: %d examples, %d steps in %.0f s; loss %s -> %s", len(examples), trainer.state.global_step,
             seconds, first.get("loss"), last.get("loss"))
    return {"examples": len(examples), "steps": trainer.state.global_step, "epochs": cfg.epochs,
            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
            "token_accuracy_last": last.get("mean_token_accuracy"), "seconds": seconds, "history": history}


def write_disabled(out_dir: str | Path) -> None:
    """What the stage writes when ``warmstart.enabled`` is false: an empty directory with :data:`DISABLED_MARKER`."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DISABLED_MARKER).write_text(json.dumps({"enabled": False}) + "\n")
