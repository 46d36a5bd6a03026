"""The cost of pinned numerics: one pipeline stage's wall time with ``numerics.isa`` native and pinned, side by side.

Runs the real warm-start stage (``pte warmstart``: full fine-tuning of the base on worked solutions, the pipeline's
first training stage) on the first ``--examples`` rows of ``data/warmstart.jsonl``, in a fresh process per run, once
per setting and ``--repeats`` times, alternating the settings so that the machine's drift hits both alike. Every run
uses the preset's thread count, so only the kernel path differs. Reports each run's wall time, the median per setting
and their ratio, the hash of the trained weights (pinned runs must all agree) and the kernel path each run recorded
(``environment.json``). Needs ``models/base`` and ``data`` (``dvc repro data base_model``).

    python bench/numerics.py --repeats 3 --out bench/results/numerics_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run_stage(work: Path, params: dict, isa: str, base: str, data: Path, tag: str) -> dict:
    """One ``pte warmstart`` run with ``numerics.isa`` = ``isa`` in its own directory; wall time, hashes, path."""
    run = work / tag
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump({**params, "numerics": {**params.get("numerics", {}), "isa": isa}}))
    cmd = [sys.executable, "-m", "pte.pipeline.cli", "warmstart", "--params", str(run / "params.yaml"), "--base", base,
           "--data", str(data), "--out", str(run / "model"), "--reports", str(run / "reports")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    weights = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    env = json.loads((run / "reports" / "environment.json").read_text())
    return {"isa": isa, "seconds": round(seconds, 2), "weights_sha256": weights,
            "aten_cpu_capability": env["aten_cpu_capability"], "threads": env["threads"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--base", default="models/base")
    p.add_argument("--data", default="data/warmstart.jsonl")
    p.add_argument("--examples", type=int, default=32, help="rows of the warm-start data (8 per optimizer step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=["native", "avx2"])
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    rows = Path(args.data).read_text().splitlines()[: args.examples]
    runs = []
    with tempfile.TemporaryDirectory(prefix="pte-bench-numerics-") as tmp:
        work = Path(tmp)
        data = work / "warmstart.jsonl"
        data.write_text("\n".join(rows) + "\n")
        for r in range(args.repeats):
            for isa in args.settings:
                runs.append({"repeat": r, **run_stage(work, params, isa, args.base, data, f"{isa}-{r}")})
                print(json.dumps(runs[-1]), flush=True)
    median = {isa: statistics.median(x["seconds"] for x in runs if x["isa"] == isa) for isa in args.settings}
    summary = {
        "stage": "warmstart", "examples": len(rows), "repeats": args.repeats,
        "threads": params.get("numerics", {}).get("threads"),
        "median_seconds": median,
        "ratio_to_native": {isa: round(median[isa] / median["native"], 3) for isa in args.settings}
        if "native" in median else None,
        "weights_agree": {isa: len({x["weights_sha256"] for x in runs if x["isa"] == isa}) == 1
                          for isa in args.settings},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
