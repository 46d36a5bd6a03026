"""Training checkpoints: written atomically, resumed bit-exactly (docs/method.md, "Loss and training").

A checkpoint directory ``<root>/step-<N>`` holds the DeepSpeed engine state (trainable parameters and
the optimizer, frozen base weights excluded), the adapter weights as safetensors, and ``meta.json``
(step, data position, RNG states, resolved config, git SHA). It is written under a temporary name and
renamed into place, then ``<root>/latest`` is replaced atomically: a run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written one.

DeepSpeed's loader unpickles its own files (``torch.load(weights_only=False)``); only resume from
checkpoints this project wrote. Adapter weights for inference are always read with safetensors.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from pte.training.runtime import is_main, world_size

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states as JSON-safe data (rollouts use explicit generators; this covers the rest)."""
    state = {"python": repr(random.getstate()),
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, root: str | Path, step: int, meta: dict[str, Any], adapter_tensors: dict[str, torch.Tensor],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` checkpoints.

    Every rank must call this (DeepSpeed saves its partitions collectively).
    """
    from safetensors.torch import save_file

    root = Path(root)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    if is_main():
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors.items()}
        save_file(tensors, str(tmp / "adapter.safetensors"))
        _write_atomic(tmp / "meta.json", json.dumps({**meta, "step": step, "rng": rng_state()}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``<root>/latest``, if complete."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(engine, path: str | Path) -> dict[str, Any]:
    """Restore engine (trainable weights + optimizer) and RNG states from ``path``; returns its meta."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path), tag="engine", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {path} has no DeepSpeed engine state; delete it to start over.")
    meta = json.loads((path / "meta.json").read_text())
    set_rng_state(meta["rng"])
    return meta
