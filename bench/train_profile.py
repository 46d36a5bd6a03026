"""Where one GRPO training step spends its time: rollout, reference forward, replay forward, loss, backward, update.

Runs our trainer (``pte.training.train.Trainer``) for ``--steps`` steps of a preset (default: cpu-demo, the pipeline's
GRPO step: 2 prompts x 4 samples of ``var_chain``, 128 new tokens, 32-slot window, ``beta`` 0.001 with a full-cache
reference) and times its phases with wall-clock timers wrapped around the functions the step calls (CUDA-synchronized on
a GPU). The phases are exclusive, so they add up to the step:

* ``rollout: generate``: :func:`pte.engine.rollout.generate` (sampling under the method's cache);
* ``rollout: decode + reward``: the rest of the trainer's rollout (decoding the completions, rewards, recall);
* ``reference forward``: the KL reference's log-probs (adapters off, no gradient; ``train.grpo.kl_cache``);
* ``replay forward``: :func:`pte.engine.replay.replay_logprobs` of the policy, segment by segment, without the loss and
the
  backward it calls per segment;
* ``loss``: the per-segment objective (``grpo_chunk``; ``sft_chunk`` / ``jsd_loss`` for the other objectives);
* ``backward``: the per-segment ``engine.backward``;
* ``optimizer step``: ``engine.step`` (gradient clipping, AdamW on the adapter);
* ``other``: the rest of the step (advantages, padding the chunks to one length, metrics).

The trainer's own ``timing/rollout_s`` and ``timing/update_s`` (also in ``models/<method>/metrics.jsonl`` of every
pipeline run) are printed beside the split. ``--torch-profile N`` additionally records the step with
``torch.profiler`` and prints its N most expensive operators (the profiler's overhead inflates the phase timings of
that run). Nothing is optimised here; this only makes the split measurable.

``--floor`` adds, per phase, the least time this device could take for the work the phase did (a roofline model, as
in ``bench/rollout.py``): a forward hook on the model counts each phase's forwards, tokens and logit positions;
``FLOPs = 2 N_ne tokens + 2 d V logit positions`` (attention, a few percent at these lengths, left out) and
``floor = max(FLOPs / GEMM roofline, forwards x weight bytes / read bandwidth)``, with the roofline (2048^3 matmul)
and the read bandwidth (sum over 1 GiB) measured in the same process first. The backward of a replay chunk is
floored by the chunk's forward (its FLOPs: gradients with respect to activations through every frozen matmul; the
adapters' own gradients are small) and by one more pass over the weights per backward call. The step's floor is
the sum; ``step / floor`` is the most any engine could speed this step up on this machine.

    python bench/train_profile.py                                 # cpu-demo preset, pte, one step
    python bench/train_profile.py --base models/warmstart --method lora_c --steps 2 --out /tmp/profile.json
    python bench/train_profile.py --params presets/smoke.yaml --torch-profile 15
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import (  # noqa: E402
    _local_model,
    gemm_roofline,
    model_sizes,
    read_bandwidth,
    roofline_floor,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout: generate", "rollout: decode + reward", "reference forward", "replay forward", "loss", "backward",
          "optimizer step", "other")


class Phases:
    """Exclusive wall-clock time per phase: a wrapped call's time minus the wrapped calls it makes."""

    def __init__(self, cuda: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self._stack: list[list] = []  # [name, seconds of timed children]
        self._cuda = cuda

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()

    def wrap(self, name: str, fn, absorbed_by: tuple[str, ...] = ()):
        """``fn`` timed as ``name``; called inside a phase of ``absorbed_by`` it counts as that phase instead."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._stack and self._stack[-1][0] in absorbed_by:
                return fn(*args, **kwargs)
            self._sync()
            start = time.perf_counter()
            self._stack.append([name, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                elapsed = time.perf_counter() - start
                _, children = self._stack.pop()
                self.seconds[name] += elapsed - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][1] += elapsed

        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """The times and call counts so far, then reset."""
        out = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return out


def instrument(trainer, phases: Phases):
    """Wrap the functions one step of ``trainer`` calls (module names in ``pte.training.train``, the trainer's methods
    and its engine's ``step``) with ``phases`` timers. Returns a function that puts ``pte.training.train``'s names
    back."""
    import pte.training.train as train_mod

    names = ("generate", "grpo_chunk", "sft_chunk", "jsd_loss", "replay_logprobs")
    saved = {attr: getattr(train_mod, attr) for attr in names}
    for attr, name in (("generate", "rollout: generate"), ("grpo_chunk", "loss"), ("sft_chunk", "loss"),
                       ("jsd_loss", "loss")):
        setattr(train_mod, attr, phases.wrap(name, getattr(train_mod, attr)))
    # the reference's own replay (adapters off, no gradient) is the reference forward, not the policy's replay
    train_mod.replay_logprobs = phases.wrap("replay forward", train_mod.replay_logprobs,
                                            absorbed_by=("reference forward",))
    trainer._rollouts = phases.wrap("rollout: decode + reward", trainer._rollouts)
    trainer._reference = phases.wrap("reference forward", trainer._reference)
    trainer._backward = phases.wrap("backward", trainer._backward)
    trainer.engine.step = phases.wrap("optimizer step", trainer.engine.step)

    def restore() -> None:
        for attr, fn in saved.items():
            setattr(train_mod, attr, fn)

    return restore


class Work:
    """Forwards, tokens and logit positions of the model per phase (a forward pre-hook), for ``--floor``."""

    def __init__(self, model, phases: Phases):
        self.phases = phases
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        phase = self.phases._stack[-1][0] if self.phases._stack else "other"
        bsz, n = ids.shape
        keep = kwargs.get("logits_to_keep", 0) or n
        self.counts[phase].update(forwards=1, tokens=bsz * n, logit_positions=bsz * min(keep, n))

    def take(self) -> dict[str, dict[str, int]]:
        out = {k: dict(v) for k, v in self.counts.items()}
        self.counts.clear()
        return out


def phase_floors(work: dict[str, dict[str, int]], calls: dict[str, int], sizes: dict, roof: dict) -> dict[str, dict]:
    """Per phase with model work: its FLOPs, weight bytes read and floor ``max(FLOPs / roofline, bytes / bandwidth)``
    (``sizes``: ``non_embedding`` parameters, ``hidden``, ``vocab``, ``weight_bytes`` per forward). The backward
    gets the replay forward's FLOPs and one weight pass per backward call."""
    def flops(w: dict[str, int]) -> float:
        head = 2.0 * sizes["hidden"] * sizes["vocab"] * w["logit_positions"]
        return 2.0 * sizes["non_embedding"] * w["tokens"] + head

    items = {name: (flops(w), w["forwards"] * sizes["weight_bytes"]) for name, w in work.items()}
    if "replay forward" in work and calls.get("backward"):
        items["backward"] = (flops(work["replay forward"]), calls["backward"] * sizes["weight_bytes"])
    return {name: {"flops": f, "weight_bytes_read": b, **roofline_floor(f, b, roof)} for name, (f, b) in items.items()}


def _rows(params, data: str | None):
    from pte.data.rows import build_splits, read_jsonl

    return read_jsonl(data) if data else build_splits(params.data)["train"]


def _print_split(step: int, seconds: dict[str, float], calls: dict[str, int], wall: float, metrics: dict,
                 floors: dict[str, dict] | None = None) -> None:
    print(f"\nstep {step}: {wall:.2f} s (trainer: rollout {metrics.get('timing/rollout_s', 0.0):.2f} s, "
          f"update {metrics['timing/update_s']:.2f} s; mean length {metrics['completions/mean_length']:.1f}, "
          f"evictions {metrics.get('cache/evictions', 0.0):.1f})")
    extra = f" {'floor s':>9s} {'bound':>8s}" if floors is not None else ""
    print(f"  {'phase':26s} {'seconds':>9s} {'share':>7s} {'calls':>6s}{extra}")
    for name in PHASES:
        if name in seconds:
            line = f"  {name:26s} {seconds[name]:9.3f} {100 * seconds[name] / wall:6.1f}% {calls.get(name, 0):6d}"
            if floors is not None and name in floors:
                line += f" {floors[name]['floor_s']:9.3f} {floors[name]['bound']:>8s}"
            print(line)
    if floors:
        total = sum(f["floor_s"] for f in floors.values())
        print(f"  floor of the step {total:.3f} s: this step is {wall / total:.2f}x its roofline-model floor")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "presets" / "cpu-demo.yaml"), help="a preset or params.yaml")
    ap.add_argument("--method", default="pte", help="pte, lora_c, lora, ... (pte.config.methods)")
    ap.add_argument("--base", help="model directory to train (e.g. models/warmstart); default: the preset's "
                                   "model.source (a GGUF is converted once into --cache-dir)")
    ap.add_argument("--data", help="training rows (JSONL, e.g. data/train.jsonl); default: the preset's train split, "
                                   "built in memory")
    ap.add_argument("--steps", type=int, default=1, help="steps to time (each printed; step 0 pays first-use costs)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N",
                    help="also record the last step with torch.profiler and print its N most expensive operators")
    ap.add_argument("--trace", help="with --torch-profile: write a Chrome trace of that step here")
    ap.add_argument("--floor", action="store_true",
                    help="measure the GEMM roofline and read bandwidth first and print each phase's floor")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pte/bench-models"))
    ap.add_argument("--out", help="write the split as JSON here")
    args = ap.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                 "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import torch

    from pte.config import load_params
    from pte.data.rows import format_prompt
    from pte.training.train import Trainer

    roof = None
    if args.floor:
        roof = gemm_roofline(2048, "cpu", "float32")  # the CPU's; on a GPU use bench/gpu_suite.py
        roof["read"] = read_bandwidth(1 << 30, "cpu")
        print(f"GEMM roofline {roof['gflops']:.1f} GFLOP/s, read bandwidth {roof['read']['gb_per_s']:.1f} GB/s")
    params = load_params(args.params)
    source = args.base or _local_model(params.model.source, Path(args.cache_dir))
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, source=source))
    rows = _rows(params, args.data)
    prompts = [format_prompt(r.problem, params.data) for r in rows]
    with tempfile.TemporaryDirectory(prefix="pte-train-profile-") as out_dir:
        solutions = None
        if params.train.objective == "sft":  # the preset's default objective trains on worked solutions
            from pte.data.tasks import worked_solutions

            solutions = worked_solutions(rows, "train.objective = 'sft'", "profile a source with a solution writer.")
        trainer = Trainer(params, args.method, prompts, [r.answer for r in rows], out_dir,
                          problems=[r.problem for r in rows], solutions=solutions)
        phases = Phases(cuda=trainer.runtime.device.type == "cuda")
        restore = instrument(trainer, phases)
        work = Work(trainer.model, phases) if roof else None
        sizes = model_sizes(trainer.model) if roof else None
        print(f"{args.method} on {source} ({trainer.runtime.device}, {trainer.runtime.precision}, "
              f"{torch.get_num_threads()} threads): {params.train.prompts_per_step} prompts x "
              f"{params.train.rollout.num_generations} samples, "
              f"{params.train.rollout.max_completion_length} new tokens, "
              f"window {params.cache.window}, beta {params.train.grpo.beta}", flush=True)
        steps = []
        try:
            for i in range(args.steps):
                profiled = args.torch_profile and i == args.steps - 1
                prof = None
                if profiled:
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if phases._cuda else [])
                    prof = profile(activities=acts, record_shapes=False)
                    prof.__enter__()
                start = time.perf_counter()
                metrics = trainer.train_step()
                wall = time.perf_counter() - start
                if prof is not None:
                    prof.__exit__(None, None, None)
                trainer.step += 1
                seconds, calls = phases.take()
                seconds["other"] = max(0.0, wall - sum(seconds.values()))
                floors = phase_floors(work.take(), calls, sizes, roof) if work else None
                _print_split(i, seconds, calls, wall, metrics, floors)
                steps.append({"step": i, "seconds": wall, "phases": seconds, "calls": calls,
                              "torch_profiler": bool(profiled),
                              "trainer_timing": {k: metrics[k] for k in ("timing/rollout_s", "timing/update_s")
                                                 if k in metrics},
                              "mean_length": metrics["completions/mean_length"],
                              "evictions": metrics.get("cache/evictions"), "reward": metrics.get("reward"),
                              **({"floors": floors, "floor_s": sum(f["floor_s"] for f in floors.values())}
                                 if floors else {})})
                if prof is not None:
                    key = "self_cuda_time_total" if phases._cuda else "self_cpu_time_total"
                    print(prof.key_averages().table(sort_by=key, row_limit=args.torch_profile))
                    if args.trace:
                        prof.export_chrome_trace(args.trace)
                        print(f"wrote {args.trace}")
        finally:
            restore()
    if args.out:
        write_result(args.out, {
            "date": date.today().isoformat(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "params": args.params, "method": args.method, "model": source,
            "command": " ".join(["python", "bench/train_profile.py", *(argv if argv is not None else sys.argv[1:])]),
            "phases": list(PHASES), "steps": steps, **({"roofline": roof} if roof else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
