"""Teacher-forced recall of trained adapters on the varying-target task, split by the recalled variable.

On ``var_chain`` with ``min_depth: 3`` the last statement recalls ``c`` or ``d``: the state has to carry both values
and the read has to pick the asked one. If an adapter learned the fixed target's habit (carry ``d``), its recall is
high on the ``d`` problems and at the twin's level on the ``c`` ones; if it carries both, the two halves move
together. Same held-out rows and replay as ``python -m research.study varchain`` (:func:`heldout_rows`,
:func:`rows_recall`); one JSON line per adapter and target::

    python -m research.recall_by_target --params runs/study/d3/params.yaml --data runs/study/d3/data \\
        --adapters runs/study/varchain-pte-d3-EW120-lr1e-3-seed0/adapter \\
                   runs/study/varchain-lora_c-d3-EW120-lr1e-3-seed0/adapter --out research/results/x.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from research.study import adapter_parser, heldout_rows, rows_recall

__all__ = ["by_target", "main"]


def by_target(rows: list) -> dict[str, list]:
    """Held-out rows grouped by the variable their (single) recalling statement recalls; rows with none or several
    recalls are left out (``var_chain`` with ``recall: 1`` has exactly one)."""
    from pte.data.tasks import recalls

    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        rec = recalls(r.problem)
        if len(rec) == 1:
            groups[rec[0].variable].append(r)
    return dict(sorted(groups.items()))


def main(argv: list[str] | None = None) -> int:
    parser = adapter_parser("python -m research.recall_by_target", __doc__, eval_size=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pte.config import load_params
    from pte.engine.inference import Generator

    params = load_params(args.params)
    _, ev = heldout_rows(params, args.data, args.eval_size)
    groups = by_target(ev)
    for adapter in args.adapters:
        gen = Generator.load(args.base, adapter)
        for target, rows in groups.items():
            line = {"adapter": adapter, "target": target, "problems": len(rows), **rows_recall(gen, rows, params)}
            print(json.dumps(line))
            with Path(args.out).open("a") as f:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
