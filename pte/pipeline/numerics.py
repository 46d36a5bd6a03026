"""Pin a process's CPU numerics before torch loads, and describe the numeric environment a run used.

:func:`pin` is the first thing every pipeline stage does (``pte.pipeline.stages``): it sets the environment of
``pte.config.numerics.pinned_environment``, then the torch-side settings (threads, deterministic algorithms), and
checks that ATen took the kernel path it was asked for. :func:`environment` is the provenance record written next to
each stage's metrics (``environment.json``) and sent to MLflow as tags
(``pte.pipeline.tracking.environment_tags``); ``pte verdict`` compares it with the committed one
(docs/reproducibility.md).
"""

from __future__ import annotations

import logging
import os
import platform
import re
from typing import Any

from pte.config.numerics import PINNED_VARIABLES, NumericsConfig, pinned_environment

__all__ = ["ISA_FLAGS", "cpu_description", "environment", "pin"]

log = logging.getLogger(__name__)

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
"""The CPU flags that decide which kernels the libraries can pick (the rest of /proc/cpuinfo's flags do not)."""


def pin(cfg: NumericsConfig) -> dict[str, str]:
    """Fix this process's numerics to ``cfg``; returns the variables it set.

    Call it before anything imports torch: ATen, MKL and oneDNN read their variables once, when they first run.
    Called later (torch already loaded by the caller), it still sets the threads and deterministic algorithms,
    and warns when ATen already runs another kernel path than ``cfg.isa`` asks for.
    """
    env = pinned_environment(cfg)
    for key, value in env.items():
        if os.environ.get(key, value) != value:
            log.info("numerics: %s=%s replaced by %s (numerics.isa %s)", key, os.environ[key], value, cfg.isa)
        os.environ[key] = value
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    want = env.get("ATEN_CPU_CAPABILITY")
    got = torch.backends.cpu.get_cpu_capability()
    if want and got.lower() != want:
        log.warning("numerics.isa = %r but ATen runs its %s kernels (torch was loaded before the pinning, or the CPU "
                    "lacks %s): this run's bytes follow the machine. Run the stage through `pte`, which pins first, or "
                    "set numerics.isa: native.", cfg.isa, got, want.upper())
    return env


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and its kernel-relevant flags (:data:`ISA_FLAGS`), from /proc/cpuinfo where it exists."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
                if model and flags and not line.strip():  # the first processor block is enough
                    break
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "flags": [f for f in ISA_FLAGS if f in flags]}


def _library_versions(config: str) -> dict[str, str]:
    """MKL and oneDNN versions as torch reports them in ``torch.__config__.show()``."""
    found = {}
    for name, pattern in (("mkl", r"Math Kernel Library Version ([\w.\-]+)"), ("onednn", r"MKL-DNN v([\w.\-]+)")):
        match = re.search(pattern, config)
        found[name] = match.group(1) if match else "absent"
    return found


def environment() -> dict[str, Any]:
    """What decided this process's numerics: CPU, kernel paths in use, threads, library versions, pinning variables.

    Deterministic on one kind of machine (no host name, no time), so a stage's ``environment.json`` is the same bytes
    on every rerun there and changes exactly when the numeric environment does.
    """
    import torch

    return {
        "cpu": cpu_description(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        **_library_versions(torch.__config__.show()),
        "python": platform.python_version(),
        "libc": "-".join(platform.libc_ver()) or "unknown",
        "variables": {k: os.environ[k] for k in PINNED_VARIABLES if k in os.environ},
    }
