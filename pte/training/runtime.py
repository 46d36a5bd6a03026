"""Process-level plumbing: device and precision, seeding, the distributed environment, the DeepSpeed engine.

``deepspeed.initialize`` is used on every device: one process on a laptop CPU (gloo, ZeRO 0-3), or many
under ``deepspeed``/``torchrun`` on GPUs. This module knows nothing about models' internals or GRPO.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys

import torch

from pte.config import Params, TrainConfig
from pte.config.numerics import derive_seed
from pte.engine.rollout import Rollout, pad_rollout

__all__ = ["Runtime", "align_ranks", "all_reduce", "init_engine", "is_main", "left_pad", "peak_memory_bytes",
           "process_peak_rss_bytes", "rank", "seed_everything", "select_rows", "shutdown_distributed",
           "world_size"]

log = logging.getLogger(__name__)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def select_rows(num_rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices for ``step``: consecutive slices of a fresh seeded permutation per epoch (resumable by step)."""
    perms: dict[int, torch.Tensor] = {}  # one permutation per epoch that the step spans
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, idx = divmod(pos, num_rows)
        if epoch not in perms:
            perms[epoch] = torch.randperm(num_rows, generator=torch.Generator().manual_seed(
                derive_seed(seed, "rows", epoch)))
        out.append(int(perms[epoch][idx]))
    return out


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

    def load_base(self, params: Params):
        """The base model and tokenizer of ``params.model`` on this runtime's device, at the dtype training needs.

        fp32 training needs fp32 weights; under bf16 DeepSpeed casts the model to bf16 anyway (fp32 master copies of
        the adapters), so loading at ``model.dtype`` (auto: bf16 on CUDA) only saves memory. Returns
        ``(model, tokenizer)``; the trainer and the sensitivity stage load through here, so they hold the same weights.
        """
        from pte.engine.models import load_model

        dtype = params.model.dtype if self.precision == "bf16" else "float32"
        return load_model(params.model.source, dtype=dtype, device=self.device,
                          attn_implementation=params.model.attn_implementation, revision=params.model.revision,
                          seed=params.base.seed)


def _skip_shm_op() -> None:
    """Keep DeepSpeed from JIT-loading its shared-memory all-reduce op in a single CPU process.

    The op only speeds up all-reduce between processes on one host, so a lone process never uses it, but loading it
    takes torch's extension-build file lock; a process killed while holding that lock leaves it behind and every later
    load waits on it forever. DeepSpeed skips an op marked incompatible (``deepspeed.comm.torch.build_shm_op``).
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_engine(model: torch.nn.Module, cfg: TrainConfig, runtime: Runtime):
    """Wrap ``model`` in a DeepSpeed engine that optimizes only its trainable (adapter) parameters.

    The client AdamW is used on every stage (DeepSpeed's fused/CPU Adam need compiled ops); the batch size
    fields are nominal because the loop feeds DeepSpeed its own micro-batches and calls ``backward`` per segment.
    The loop calls the model directly, so :class:`_ForwardPrologue` does DeepSpeed's per-forward bookkeeping; under
    ZeRO-3 the adapters stay gathered (:func:`_keep_gathered`) and only the frozen base weights are partitioned.

    ZeRO-2 reduces and ZeRO-3 also gathers weights inside every backward/forward, so with several processes every rank
    must run the same sequence of forwards and backward passes (same rollout length and number of segments): the
    trainer decodes with ``generate(sync_ranks=True)`` and pads every rank's rollout alike
    (:func:`align_ranks`).
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        if runtime.device.type == "cpu" and world_size() == 1:
            _skip_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if runtime.device.type == "cuda" else "gloo")
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
    if cfg.zero_stage == 3:
        _keep_gathered(engine, params)
    if cfg.zero_stage > 0:
        model.register_forward_pre_hook(_ForwardPrologue(engine, zero_grad_buffer=cfg.zero_stage == 3))
    return engine


class _ForwardPrologue:
    """What ``DeepSpeedEngine.forward`` does before a forward, for a model that is called directly.

    The loop calls the model itself (rollout, replay, reference), never ``engine(...)``, so DeepSpeed's forward
    prologue must run from a forward pre-hook. ZeRO counts backward passes there: ``clear_backward_seen_flag``
    advances ZeRO-3's ``micro_step_id`` when a backward ran since the last forward, and ``partition_grads`` *copies*
    a gradient into its partition while ``micro_step_id == 0`` and adds it afterwards (deepspeed 0.19.8
    ``stage3.py``). Without the prologue every segment's backward overwrote the previous ones: only the last
    backward of a step survived. It also resets the backward-hook bookkeeping of every ZeRO stage.

    ZeRO-3 copies only the gradients present in the first backward of a step; a parameter whose gradient first
    appears in a later backward (e.g. ``wa_k``/``wa_v`` of ``pte_no_global`` reach the loss only through eviction
    events, from the second segment on) would be added to the previous step's stale partition, and one without any
    gradient would reuse it. So the partitions are zeroed before the first backward of every step instead.
    """

    def __init__(self, engine, zero_grad_buffer: bool):
        self.engine, self.zero_grad_buffer, self.zeroed_at = engine, zero_grad_buffer, None
        needed = ["clear_backward_seen_flag"] + (["micro_step_id", "grad_partitions_flat_buffer"] * zero_grad_buffer)
        missing = [n for n in needed if not hasattr(engine.optimizer, n)]
        if missing:  # DeepSpeed internals relied on (deepspeed==0.19.8 is pinned): fail here, not with wrong gradients
            import deepspeed

            raise RuntimeError(f"deepspeed {deepspeed.__version__}: the ZeRO optimizer has no {missing}; pte's "
                               "gradient accumulation over direct model calls was written for deepspeed 0.19.8.")

    def __call__(self, module, args):
        opt = self.engine.optimizer
        opt.clear_backward_seen_flag()
        if self.zero_grad_buffer and opt.micro_step_id == 0 and self.zeroed_at != self.engine.global_steps:
            opt.grad_partitions_flat_buffer.zero_()  # no backward yet in this step: nothing to lose
            self.zeroed_at = self.engine.global_steps


def shutdown_distributed() -> None:
    """Destroy the default process group, if one is up (``init_engine`` starts it; a later engine starts a new one).

    A process that exits with the group alive can abort during interpreter shutdown, in gloo's worker threads
    (SIGABRT, "terminate called without an active exception"), and so fail a job whose training succeeded; NCCL
    warns of the same. Call it once training is over, on every rank.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _keep_gathered(engine, params: list[torch.nn.Parameter]) -> None:
    """Under ZeRO-3 keep the trainable (adapter) parameters whole on every rank; frozen base weights stay partitioned.

    ZeRO-3 gathers a parameter only in its own module's forward; the thought encoder's parameters are read by
    ``PTEAdapter.begin``/``SegmentState.build`` outside any forward, and the adapters are saved from the module.
    ZeRO's own mechanism for this is a *persistent* parameter (what it applies to every parameter under
    ``stage3_param_persistence_threshold``): kept gathered, re-gathered after every optimizer step and checkpoint.
    Marking them external as well stops the forward/backward hooks from releasing them between uses. Gradients and
    optimizer states stay partitioned, so memory grows only by the adapters' weights (small by design).
    """
    opt = engine.optimizer
    extra = [p for p in params if not p.ds_persist]
    for p in params:
        p.ds_persist = True
        p.is_external_param = True
    opt.persistent_parameters.extend(extra)  # the list the optimizer re-gathers after step() and checkpoints
    params[0].all_gather(params)


def process_peak_rss_bytes() -> int | None:
    """The process's peak resident memory in bytes (a high-water mark, never reset); the current RSS where the OS has
    no peak (not POSIX; None without psutil)."""
    try:
        import resource
    except ImportError:
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``max_memory_allocated`` on CUDA, peak RSS of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process_peak_rss_bytes() or 0


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise ``sum`` or ``max`` over the ranks (one all-reduce in float64; exact for integers below 2**53)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    reduce_op = torch.distributed.ReduceOp
    torch.distributed.all_reduce(t, op=reduce_op.MAX if op == "max" else reduce_op.SUM)
    return t.tolist()


def left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen a left-padded prompt block to ``length`` columns (more masked padding on the left)."""
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], dim=1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1))


def align_ranks(chunks: list[Rollout], pad_token_id: int, device: torch.device) -> list[Rollout]:
    """Pad each rollout chunk to the longest completion of the same chunk on any rank (a no-op in one process).

    ZeRO-3 gathers the partitioned weights in every forward (and again in every backward), ZeRO-2 reduces in every
    backward: all ranks must run the same sequence of forwards and backwards. Replay runs one chunk per segment
    (:func:`pte.engine.replay.replay_chunks`), a pure function of the cache plan and the column count, and one replay
    per micro-batch. The trainer gives every rank the same prompt block (so the same plan) and the same row counts; here
    the column counts are made equal. Padded columns are masked: zero weight, no change to the loss or gradient.
    """
    if world_size() == 1:
        return chunks
    layout = [float(v) for c in chunks for v in (c.tokens.shape[0], c.plan.prompt_len, c.plan.window or 0,
                                                  c.plan.evict)]
    got = all_reduce([float(c.tokens.shape[1]) for c in chunks] + layout + [-v for v in layout], device, "max")
    n = len(chunks)
    hi, lo = got[n : n + len(layout)], [-v for v in got[n + len(layout) :]]
    if hi != lo:  # the same verdict on every rank, so all of them stop here instead of deadlocking later
        raise RuntimeError(f"rank {rank()}: the ranks' rollouts differ in rows or cache plan (rows, P, W, e per chunk: "
                           f"max {hi}, min {lo}); they would run different numbers of forward/backward passes.")
    return [pad_rollout(c, int(length), pad_token_id) for c, length in zip(chunks, got[:n], strict=True)]
