"""How much of the thought state is the static global state S_g, and how much does the state vary between problems?

The research log (twentieth entry) left a hypothesis for why the paper's form (with S_g) learns no recall where
#Global-0 does: ``S = Normalize(S_g + E)``, with ``E`` the event writes, and a static ``S_g`` that every problem
writes alike could dominate the normalised state, so that the state barely differs between problems and the
gradient that would bind an evicted value to its key is diluted. This script measures it on worked solutions of
held-out problems, replayed teacher-forced under the training cache (no gradient), at every segment that has seen
an eviction, per layer ``l``, global row ``g`` and problem ``b``:

* ``ratio``: ``|S_g[l, g]| / |E[l, b, g]|`` (0 without S_g);
* ``cos_sg``: the cosine between ``S[l, b, g]`` and ``S_g[l, g]`` (1: the state is S_g's direction; absent without
  S_g);
* ``spread``: ``|S[l, b, g] - mean_b S[l, :, g]|`` for the unit-norm rows of ``S``: how much the state differs between
  problems (0: the same state for every problem; about 1.41 for unrelated directions).

Means over problems, rows, layers and segments, and the mean at the last segment (the recall sits near the end).
``--init`` also measures a fresh adapter of each trained adapter's form (``--init-pte`` changes its ``pte`` settings),
seeded as training seeds it::

    python -m research.state_share --params params.yaml --data data --adapters DIR... --init --out x.jsonl
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["main", "measure", "recording"]


@contextmanager
def recording(out: list[dict[str, float]]):
    """Record the share statistics of every state the replay builds (both write forms add ``E`` to ``S_g``)."""
    from pte.engine import writes
    from pte.engine.state import normalize_rows

    originals = {cls: cls.rebuild for cls in (writes.LinearWrite, writes.SoftmaxWrite)}

    def wrap(cls):
        def rebuild(self, qa, base):
            pre = originals[cls](self, qa, base)
            if pre is not base:  # an eviction has been written
                with torch.no_grad():
                    e, s = pre - base, normalize_rows(pre, 1e-6)  # [L, B, G, r]
                    sg = base.norm(dim=-1)
                    row = {"ratio": (sg / e.norm(dim=-1).clamp_min(1e-12)).mean().item(),
                           "spread": (s - s.mean(dim=1, keepdim=True)).norm(dim=-1).mean().item()}
                    if bool((sg > 0).any()):
                        row["cos_sg"] = (s * normalize_rows(base, 1e-6)).sum(-1).mean().item()
                    out.append(row)
            return pre
        return rebuild

    for cls in originals:
        cls.rebuild = wrap(cls)
    try:
        yield
    finally:
        for cls, fn in originals.items():
            cls.rebuild = fn


def measure(model, tok, rows: list, params, batch_size: int = 16) -> dict[str, float]:
    """The share statistics of ``model`` (a PTE policy) on ``rows``' worked solutions under ``params.cache``."""
    from pte.engine.cache import plan_cache
    from pte.engine.inference import eos_ids
    from pte.engine.replay import replay_logprobs
    from pte.training.objectives import sft_batch
    from research.study import rows_inputs

    eos = eos_ids(model, tok)[0]
    problems, prompts, solutions = rows_inputs(rows, params)
    per_batch = []
    for a in range(0, len(rows), batch_size):
        batch = sft_batch(tok, prompts[a : a + batch_size], problems[a : a + batch_size],
                          solutions[a : a + batch_size], params.data.system_prompt, eos)
        stats: list[dict[str, float]] = []
        with torch.no_grad(), recording(stats):
            replay_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask,
                            plan_cache(params.cache, batch.prompt_ids.shape[1]))
        per_batch.append(stats)
    out = {}
    for key in per_batch[0][0]:
        out[key] = sum(sum(s[key] for s in b) / len(b) for b in per_batch) / len(per_batch)
        out[f"{key}_last"] = sum(b[-1][key] for b in per_batch) / len(per_batch)
    out["segments"] = sum(len(b) for b in per_batch) / len(per_batch)
    return out


def main(argv: list[str] | None = None) -> int:
    from research.study import _parse_sets, _put, _record, adapter_parser, heldout_rows

    parser = adapter_parser("python -m research.state_share", __doc__, eval_size=64)
    parser.add_argument("--init", action="store_true", help="also a fresh adapter of each form, seeded as training")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the fresh adapters")
    parser.add_argument("--init-pte", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change the fresh adapters' pte settings, e.g. use_global_state=true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pte.config import AdapterConfig, PTEConfig, load_params, section_from_dict
    from pte.engine.adapters import attach_adapter, read_adapter_meta, upgrade_pte_meta
    from pte.engine.inference import Generator
    from pte.training.runtime import seed_everything

    params = load_params(args.params)
    _, ev = heldout_rows(params, args.data, args.eval_size)
    changes = _parse_sets(args.init_pte)  # dotted keys into the pte section: extensions.write=softmax

    def fresh(meta: dict, adapter: str):
        gen = Generator.load(args.base)
        seed_everything(args.seed)  # as the trainer seeds before attaching (pte.training.train)
        attach_adapter(gen.model, meta["method"], section_from_dict(AdapterConfig, meta["adapter"], "adapter"),
                       section_from_dict(PTEConfig, upgrade_pte_meta(meta["pte"], adapter, meta["method"]), "pte"))
        gen.model.eval()
        return gen

    for adapter in args.adapters:
        meta = read_adapter_meta(adapter)
        runs = [("trained", meta, lambda adapter=adapter: Generator.load(args.base, adapter))]
        if args.init:
            init_meta = copy.deepcopy(meta)
            for key, value in changes.items():
                _put(init_meta["pte"], key, value)
            runs.append(("init", init_meta, lambda m=init_meta, adapter=adapter: fresh(m, adapter)))
        for kind, m, load in runs:
            gen = load()
            _record(Path(args.out), {"adapter": adapter, "kind": kind, "pte": m["pte"], "problems": len(ev),
                                     **measure(gen.model, gen.tokenizer, ev, params)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
