"""Process-level plumbing: device and precision, seeding, the distributed environment, the DeepSpeed engine.

``deepspeed.initialize`` is used on every device: one process on a laptop CPU (gloo, ZeRO 0-3), or many
under ``deepspeed``/``torchrun`` on GPUs. This module knows nothing about models' internals or GRPO.
"""

from __future__ import annotations

import logging
import os
import random
import socket

import torch

from pte.config import TrainConfig

__all__ = ["Runtime", "init_engine", "is_main", "peak_memory_bytes", "rank", "seed_everything", "world_size"]

log = logging.getLogger(__name__)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the core
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runtime:
    """Resolved device, dtype and process layout of a training run."""

    def __init__(self, cfg: TrainConfig):
        want = cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if want == "cuda" else "fp32")
        if precision == "bf16" and want == "cpu":
            log.warning("bf16 on CPU is slow and changes numerics; fp32 is the CPU default")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if "RANK" not in os.environ:  # a plain single-process launch: DeepSpeed still wants a process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)


def init_engine(model: torch.nn.Module, cfg: TrainConfig, runtime: Runtime):
    """Wrap ``model`` in a DeepSpeed engine that optimizes only its trainable (adapter) parameters.

    The client AdamW is used on every stage (DeepSpeed's fused/CPU Adam need compiled ops); the batch size
    fields are nominal because the loop feeds DeepSpeed its own micro-batches and calls ``backward`` per segment.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if runtime.device.type == "cuda" else "gloo")
    if cfg.zero_stage == 3:
        # Measured with deepspeed 0.19.8 (CPU, gloo): ZeRO-3 sums the gradients of several backward passes into one
        # optimizer step incorrectly (SGD on a 2-layer toy disagrees with plain PyTorch both with
        # managed_gradient_accumulation on and off, and with gradient_accumulation_steps > 1), while a single backward
        # per step is right. Segment-wise replay needs many backward passes per step, so stage 3 would silently train
        # on wrong gradients.
        raise ValueError("train.zero_stage = 3 is not supported: DeepSpeed ZeRO-3 mis-accumulates gradients over the "
                         "several backward passes of one step that segment-wise replay needs; use zero_stage 2, which "
                         "also partitions gradients and optimizer states (the adapters are small; base weights are "
                         "frozen and never in the optimizer).")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; the 'base' method cannot be trained.")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # One optimizer step spans many backward calls (every segment of every micro-batch): in unmanaged mode
        # backward() only accumulates locally and step() does the (ZeRO) reduction and the update.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": runtime.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=ds_config)
    return engine


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``max_memory_allocated`` on CUDA, peak RSS of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
