"""The ``pte`` console script: ``pte generate``, ``pte tracking sync``, ``pte verdict`` and the pipeline stage
commands.

Each command parses its arguments, calls one function of the package and prints; user errors
(bad paths, bad values) are reported as one ``error:`` line with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_OFFLINE_DEFAULTS = {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate under the bounded KV cache",
                       description="Generate under the bounded KV cache (prompt block + sliding thinking window).")
    p.add_argument("--model", help="HF directory, hub id, .gguf, pkg://... or random:<preset> (default: the adapter's "
                                   "base model)")
    p.add_argument("--adapter", help="adapter directory written by the train stage (LoRA or PTE)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--window", type=int, help="thinking-window slots W (default 512)")
    cache.add_argument("--budget", type=int, help="total cache slots: prompt block + thinking window")
    cache.add_argument("--full-cache", action="store_true", help="never evict")
    p.add_argument("--evict-ratio", type=float, default=0.25, help="fraction of the window evicted per event")
    p.add_argument("--max-new-tokens", type=int, default=256)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=_cmd_generate)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_generate(args: argparse.Namespace) -> int:
    from pte.config import CacheConfig, SamplingConfig
    from pte.engine.inference import Generator

    if args.full_cache:
        cache = CacheConfig(window=None, evict_ratio=args.evict_ratio)
    elif args.budget is not None:
        cache = CacheConfig(window=None, budget=args.budget, evict_ratio=args.evict_ratio)
    else:
        cache = CacheConfig(window=512 if args.window is None else args.window, evict_ratio=args.evict_ratio)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                              top_p=args.top_p, top_k=args.top_k)
    gen = Generator.load(args.model, args.adapter, dtype=args.dtype, device=args.device)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    results = gen(args.prompt, cache, sampling, seed=args.seed, raw=args.raw, progress=progress)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(r["text"])
    return 0


def _tracking_parser(sub) -> None:
    p = sub.add_parser("tracking", help="MLflow tracking utilities")
    tsub = p.add_subparsers(dest="tracking_command", required=True)
    s = tsub.add_parser("sync", help="replay an offline training run (metrics.jsonl) into MLflow, once",
                        description="Replay the params and per-step metrics of a run that trained while the MLflow "
                                    "server was unreachable. Idempotent: a run already synced is not logged again.")
    s.add_argument("run", help="training output directory holding metrics.jsonl (e.g. models/pte), or the file")
    s.add_argument("--params", help="params file whose `tracking` section names the server and experiment (default: "
                                    "params.yaml when it exists, else the tracking defaults)")
    s.add_argument("--tracking-uri", help="override tracking.tracking_uri (e.g. http://127.0.0.1:5000)")
    s.add_argument("--experiment", help="override tracking.experiment")
    s.add_argument("--run-name", help="MLflow run name (default: train-<method> from the run's params)")
    s.set_defaults(func=_cmd_tracking_sync)


def _cmd_tracking_sync(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from pte.config import TrackingConfig, load_params
    from pte.pipeline.tracking import sync_run

    if args.params or Path("params.yaml").is_file():
        cfg = load_params(args.params or "params.yaml").tracking
    else:
        cfg = TrackingConfig()
    overrides = {"tracking_uri": args.tracking_uri, "experiment": args.experiment}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    result = sync_run(args.run, cfg, run_name=args.run_name)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _verdict_parser(sub) -> None:
    p = sub.add_parser("verdict", help="did this run reproduce the committed results? If not, why may it differ",
                       description="Compare the working tree after `dvc repro` with a git revision: the stages whose "
                                   "outputs differ, the numeric environment (environment.json), and each evaluation "
                                   "metric against its committed bootstrap interval. Exit status 0 when reproduced or "
                                   "consistent, 1 when a metric falls outside its interval (docs/reproducibility.md).")
    p.add_argument("--ref", default="HEAD", help="git revision holding the committed lock and metrics (default HEAD)")
    p.add_argument("--root", default=".", help="repository root (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=_cmd_verdict)


def _cmd_verdict(args: argparse.Namespace) -> int:
    from pte.pipeline.verdict import verdict_at

    v = verdict_at(args.root, args.ref)
    print(json.dumps(v.to_dict(), indent=2) if args.json else v.report())
    return 1 if v.conclusion == "changed" else 0


def build_parser(extra: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pte", description="Progressive Thought Encoding: GRPO under a bounded KV "
                                                             "cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _tracking_parser(sub)
    _verdict_parser(sub)
    for add in extra:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for k, v in _OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from pte.pipeline.stages import add_stage_parsers

    parser = build_parser([add_stage_parsers])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
