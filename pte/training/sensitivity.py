"""The frozen base's eviction sensitivity for eviction-weighted ``sft``, computed once for every method.

``train.sft.eviction_weight`` weighs each token of a worked solution by the frozen base's eviction sensitivity
(:func:`pte.training.objectives.eviction_sensitivity`: its NLL under the training cache minus under a full cache).
That depends on the base, the training cache and the step's rows, not on the method, so every bounded-cache method
(``lora_c``, ``pte``) would compute the same tensors, at about 80% of a plain step's cost while the weight is on.
The ``sensitivity`` stage computes them once, for the steps of the weighted phase, with the step's rows batched as
the trainer batches them; the trainer reads a step's tensor when its rows match and computes it otherwise (another
rank layout, another seed or number of rows a step). On the CPU the precomputed tensor is the same bits as the
one the trainer would compute (tested), so the stage changes no result, only the time (docs/pipeline.md).

File (:data:`SENSITIVITY_FILE`): one safetensors file, per weighted step ``s`` the keys ``sensitivity.s`` (``[B, T]``
float, the step's rows in order, T the longest solution of the step) and ``rows.s`` (``[B]`` int64, the training
rows). A step's tensor is matched by its rows and shape only: after a change to the base, the cache, the
micro-batch or the prompt format, recompute the file (DVC does, since the stage lists them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pte.config import Params
from pte.config.training import eviction_weight

__all__ = ["SENSITIVITY_FILE", "compute_sensitivities", "load_sensitivities", "step_sensitivity", "weighted_steps"]

SENSITIVITY_FILE = "sensitivity.safetensors"
"""The file the sensitivity stage writes in its output directory, and ``pte train --sensitivity DIR`` reads."""


def weighted_steps(params: Params) -> int:
    """How many leading steps carry an eviction weight (0 when none, or when the training cache evicts nothing)."""
    if params.cache.is_full:
        return 0
    return sum(1 for step in range(params.train.steps) if eviction_weight(params.train, step) > 0)


def compute_sensitivities(params: Params, prompts: list[str], problems: list[str], solutions: list[str],
                          out: str | Path, progress: bool = True) -> dict[str, int]:
    """Write the eviction sensitivity of every weighted step to ``out`` (a safetensors file; no weighted step: a file
    with no tensors). The base model is ``params.model.source``, loaded as the trainer loads it; the rows of step
    ``s`` are the trainer's (``select_rows`` with ``base.seed``), encoded and micro-batched as it does.

    Returns:
        ``{"steps": weighted steps, "rows": rows scored}``.
    """
    from safetensors.torch import save_file

    from pte.engine.cache import plan_cache
    from pte.engine.inference import eos_ids
    from pte.training.objectives import batch_sensitivity, sft_batch
    from pte.training.runtime import Runtime, seed_everything, select_rows

    cfg, n = params.train, weighted_steps(params)
    tensors: dict[str, torch.Tensor] = {}
    if n:
        runtime = Runtime(cfg)
        seed_everything(params.base.seed)
        model, tok = runtime.load_base(params)
        model.eval()
        eos = eos_ids(model, tok)[0]
        from tqdm.auto import tqdm

        for step in tqdm(range(n), desc="eviction sensitivity", disable=not progress):
            rows = select_rows(len(prompts), step, cfg.prompts_per_step, params.base.seed)
            batch = sft_batch(tok, [prompts[i] for i in rows], [problems[i] for i in rows],
                              [solutions[i] for i in rows], params.data.system_prompt, eos, runtime.device)
            sens = batch_sensitivity(model, batch, plan_cache(params.cache, batch.prompt_ids.shape[1]),
                                     cfg.micro_batch)
            tensors[f"sensitivity.{step}"] = sens.cpu().contiguous()
            tensors[f"rows.{step}"] = torch.tensor(rows, dtype=torch.int64)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return {"steps": n, "rows": n * cfg.prompts_per_step}


def load_sensitivities(path: str | Path) -> dict[int, tuple[list[int], torch.Tensor]]:
    """``{step: (rows, sensitivity [B, T])}`` from a file of :func:`compute_sensitivities`.

    Raises:
        FileNotFoundError: no such file (run the sensitivity stage first, or train without it).
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no eviction sensitivity file at {str(path)!r}; run the sensitivity stage first "
                                "(dvc repro sensitivity) or train without --sensitivity.")
    tensors = load_file(str(path))
    steps = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("sensitivity."))
    return {s: (tensors[f"rows.{s}"].tolist(), tensors[f"sensitivity.{s}"]) for s in steps}


def step_sensitivity(sensitivities: dict[int, tuple[list[int], torch.Tensor]], step: int, rows: list[int],
                     tokens: torch.Tensor) -> torch.Tensor | None:
    """Step ``step``'s sensitivity ``[B, T]`` from :func:`load_sensitivities` when it was computed for exactly these
    ``rows`` and ``tokens``' shape, on ``tokens``' device; else None (the trainer computes it)."""
    rows_then, sens = sensitivities.get(step, (None, None))
    if rows_then != rows or sens.shape != tokens.shape:
        return None
    return sens.to(tokens.device)
