"""The ``numerics`` section: what decides the bits of a CPU run, fixed so that they do not depend on the machine.

On x86, three libraries pick their kernels from the CPU they find, and each path rounds differently:
ATen's vectorised kernels (softmax, norms, activations, reductions: ``ATEN_CPU_CAPABILITY``), MKL's GEMMs (every
linear layer: ``MKL_CBWR``) and oneDNN (``ONEDNN_MAX_CPU_ISA``). The thread count splits reductions. Left to the
machine, an AVX-512 CPU and an AVX2 CPU train different weights from the first step (docs/reproducibility.md).
:func:`pinned_environment` names the process environment that fixes them; ``pte.pipeline.numerics.pin`` sets it
before torch loads. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pte.config.schema import check_range

__all__ = ["ISA_ENVIRONMENT", "PINNED_VARIABLES", "NumericsConfig", "derive_seed", "pinned_environment"]


def derive_seed(seed: int, purpose: str, *parts: object) -> int:
    """The seed scheme of training and evaluation: the seed of one random draw, a stable hash of the run seed
    (``base.seed``), what the draw is for (``rows``, ``rollout``, ``eval``) and where it is (step, rank, batch, ...),
    in ``[0, 2^63)``. Draws for different purposes or places are independent, and each is the same in every process
    and on every machine."""
    key = ":".join(map(str, (seed, purpose, *parts))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)

ISA_ENVIRONMENT: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "native": {},
}
"""The variables each ``numerics.isa`` sets. ``native`` sets none: every library takes the best path of the CPU."""

PINNED_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "MKL_DYNAMIC", "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG")
"""Every variable that :func:`pinned_environment` may set or that changes a kernel path; recorded with each run."""


@dataclass(frozen=True)
class NumericsConfig:
    """How a CPU run fixes its numerics (docs/reproducibility.md). The defaults give the same bytes on every x86
    machine with AVX2, at a measured cost on AVX-512 machines (docs/benchmarks.md, "Pinned numerics")."""

    isa: Literal["avx2", "avx512", "native"] = "avx2"
    """The instruction set of the CPU kernels (ATen, MKL, oneDNN). ``avx2`` runs on every x86-64 CPU of the last
    decade; ``avx512`` only where the CPU has it; ``native`` lets each library take the CPU's best path (fastest,
    but the bytes then depend on the machine)."""
    threads: int = 2
    """Intra-op CPU threads (torch, OpenMP, MKL). Reductions split by thread, so the bytes hold only for the same
    count; 0 leaves each library's default (the machine's core count)."""
    deterministic: bool = True
    """``torch.use_deterministic_algorithms`` (warn-only: an op without a deterministic kernel warns, it does not
    stop the run), plus cuBLAS's fixed workspace on CUDA."""

    def __post_init__(self) -> None:
        if self.isa not in ISA_ENVIRONMENT:
            raise ValueError(f"numerics.isa: {self.isa!r} is not one of {sorted(ISA_ENVIRONMENT)}; use avx2 (the same "
                             "bytes on every x86 machine) or native (fastest, machine-dependent).")
        check_range("numerics.threads", self.threads, 0)


def pinned_environment(cfg: NumericsConfig) -> dict[str, str]:
    """The process environment that fixes ``cfg``: variable -> value, to set before torch loads.

    MKL's conditional numerical reproducibility (``MKL_CBWR``) and ``MKL_DYNAMIC=FALSE`` keep its GEMMs on one code
    path and one thread split; ``CUBLAS_WORKSPACE_CONFIG`` is what CUDA needs for deterministic cuBLAS.
    """
    env = dict(ISA_ENVIRONMENT[cfg.isa])
    if cfg.threads:
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads), MKL_DYNAMIC="FALSE")
    if cfg.deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env
