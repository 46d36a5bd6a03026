"""Several processes: every rank runs the same forwards and backwards, whatever its own rows do.

ZeRO-3 gathers the partitioned weights in every forward (and backward), ZeRO-2 reduces in every backward, so a rank
whose rows all end early must keep step with the others: ``generate(sync_ranks=True)`` decodes until every rank is done
and the trainer pads every rank's rollout to the longest one (masked columns, no change to the loss or gradient).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny

from pte.config import AdapterConfig, CacheConfig, PTEConfig, SamplingConfig
from pte.engine.adapters import attach_adapter
from pte.engine.replay import replay_chunks, replay_logprobs
from pte.engine.rollout import generate, pad_rollout
from pte.training.grpo import GRPOLossConfig, per_token_objective, token_weights


def _pte_model():
    model, tok = tiny("llama-tiny")
    attach_adapter(model, "pte", AdapterConfig(rank=8), PTEConfig(global_tokens=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("pte_up"):
                p.normal_(0.0, 0.3)
    return model, tok


def _same_rollout(a, b):
    for f in ("prompt_ids", "prompt_mask", "tokens", "logprobs", "mask", "finished", "num_evictions"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.event_steps == b.event_steps and a.plan == b.plan


def test_sync_ranks_without_a_process_group_changes_nothing(monkeypatch, one_thread):
    """No process group (or the one-rank group an in-process Trainer leaves behind): no collective, same rollout."""
    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1

    def no_collective(*args, **kwargs):
        raise AssertionError("generate() called a collective in a single process")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    model, tok = _pte_model()
    ids, am = batch(tok)
    cache, sampling = CacheConfig(window=8, evict_ratio=0.25), SamplingConfig(max_new_tokens=30, temperature=1.0)

    def run(sync):
        return generate(model, ids, am, cache, sampling, [tok.eos_token_id], tok.pad_token_id,
                        generator=torch.Generator().manual_seed(7), sync_ranks=sync)

    _same_rollout(run(True), run(False))
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    plain, _ = tiny("llama-tiny")
    ref = plain.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=20,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    out = generate(plain, ids, am, CacheConfig(window=None), greedy, [tok.eos_token_id], tok.pad_token_id,
                   sync_ranks=True)
    assert torch.equal(out.tokens, ref)


def test_sync_ranks_keeps_decoding_padding_while_another_rank_runs(monkeypatch, one_thread):
    """A fake second rank that never finishes: this rank's rows end early, yet it decodes up to max_new_tokens."""
    model, tok = _pte_model()
    ids, am = batch(tok)
    cache, sampling = CacheConfig(window=6, evict_ratio=0.5), SamplingConfig(max_new_tokens=25, temperature=0.0)
    free = generate(model, ids, am, cache, sampling, [tok.eos_token_id], tok.pad_token_id)
    eos = sorted({int(t) for t in free.tokens[:, 4]})  # every row ends by its 5th token
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    alone = generate(model, ids, am, cache, sampling, eos, tok.pad_token_id)
    n_alone = len(forwards)
    assert alone.finished.all() and alone.tokens.shape[1] <= 5 and n_alone == alone.tokens.shape[1]

    reduced = []

    def all_reduce(t, op=None):
        assert t.numel() == 1 and op == torch.distributed.ReduceOp.MAX
        reduced.append(int(t))
        t.fill_(1)  # the other rank still runs

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    forwards.clear()
    synced = generate(model, ids, am, cache, sampling, eos, tok.pad_token_id, sync_ranks=True)
    assert len(forwards) == sampling.max_new_tokens  # prefill + 24 decode steps, like the rank that never stops
    assert reduced[: alone.tokens.shape[1] - 1] == [1] * (alone.tokens.shape[1] - 1) and reduced[-1] == 0
    _same_rollout(synced, alone)  # the rollout itself is this rank's alone, cut at its own longest row


def test_padded_rollout_gives_the_same_loss_and_gradient(one_thread):
    model, tok = _pte_model()
    ids, am = batch(tok)
    out = generate(model, ids, am, CacheConfig(window=8, evict_ratio=0.25), SamplingConfig(max_new_tokens=20),
                   [tok.eos_token_id], tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    padded = pad_rollout(out, out.tokens.shape[1] + 13, tok.pad_token_id)
    assert len(replay_chunks(padded.plan, padded.tokens.shape[1])) > len(replay_chunks(out.plan, out.tokens.shape[1]))
    assert torch.equal(padded.lengths, out.lengths) and (padded.logprobs[:, out.tokens.shape[1]:] == 0).all()
    adv = torch.tensor([1.0, -0.5, 0.25])
    cfg = GRPOLossConfig(loss_type="grpo", beta=0.0)

    def loss_and_grads(r):
        model.zero_grad()
        weights, total = token_weights(r.mask, cfg.loss_type), []

        def on_segment(cols, lp):
            obj, _ = per_token_objective(lp, r.logprobs[:, cols], None, adv, r.mask[:, cols], cfg)
            loss = (obj * weights[:, cols]).sum()
            loss.backward()
            total.append(float(loss.detach()))

        replay_logprobs(model, r.prompt_ids, r.prompt_mask, r.tokens, r.mask, r.plan, on_segment=on_segment)
        return sum(total), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(out)
    loss_p, grads_p = loss_and_grads(padded)
    assert loss_p == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for k, g in grads.items():
        torch.testing.assert_close(grads_p[k], g, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --- two processes over gloo, one of whose rows all end after their first token ------------------------------------

WORKER = r'''
import functools, json, os, sys
from pathlib import Path
import torch
torch.optim.AdamW.__init__ = functools.partialmethod(torch.optim.AdamW.__init__, eps=1e-3)  # see test_train.ADAMW_EPS
torch.set_num_threads(1)  # two ranks on a 2-core machine
import pte.training.runtime
import pte.training.train as train_mod
from pte.config import params_from_dict

root, early = Path(sys.argv[1]), int(sys.argv[2])
rank = int(os.environ["RANK"])
if rank == early:  # every token ends a row: this rank's completions are one token long
    train_mod.eos_ids = lambda model, tok: list(range(model.config.vocab_size))
prompts = ["Write lowercase letters.", "abc", "Only letters please:", "Letters!"]


def run(stage):
    out = root / f"z{stage}"
    params = params_from_dict({
        "model": {"source": "random:llama-tiny-wide"},
        # a budget: the window depends on the prompt block, which the ranks must therefore share
        "cache": {"window": None, "budget": 56, "evict_ratio": 0.5},
        "adapter": {"rank": 8, "alpha": 16.0}, "pte": {"global_tokens": 4},
        "train": {"steps": 2, "prompts_per_step": 2, "micro_batch": 2, "lr": 0.02, "save_every": 100,
                  "zero_stage": stage, "rollout": {"num_generations": 4, "max_completion_length": 24, "batch": 4},
                  "grpo": {"reward": "char_match", "beta": 0.01}}})
    trainer = train_mod.Trainer(params, "pte", prompts, ["abcdefghijklmnopqrstuvwxyz"] * 4, out)
    counts = {"forward": 0, "backward": 0, "lengths": [], "prompt_len": []}

    def count_forward(module, args):
        counts["forward"] += 1

    trainer.model.register_forward_pre_hook(count_forward)
    backward, rollouts = trainer.engine.backward, trainer._rollouts

    def count_backward(*a, **k):
        counts["backward"] += 1
        return backward(*a, **k)

    def record(rows):
        chunks, rewards = rollouts(rows)
        counts["lengths"] += [int(n) for c in chunks for n in c.lengths]
        counts["prompt_len"] += [c.plan.prompt_len for c in chunks]
        return chunks, rewards

    trainer.engine.backward, trainer._rollouts = count_backward, record
    trainer.run(progress=False)
    (out / f"counts{rank}.json").write_text(json.dumps(counts))


for stage in map(int, sys.argv[3].split(",")):  # one process pair for all stages: start-up is most of the time
    run(stage)
# as `pte train` does (pte.pipeline.stages.stage_train): exiting with the gloo group alive can abort a rank at shutdown
pte.training.runtime.shutdown_distributed()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp: Path, stages: tuple[int, ...], early: int, timeout: float = 150.0) -> dict[int, list[dict]]:
    """Run WORKER as ranks 0 and 1 (gloo) for each ZeRO stage in turn; a deadlock fails after ``timeout`` seconds.

    Returns each stage's per-rank counts of forwards, backwards, completion lengths and prompt widths.
    """
    (tmp / "worker.py").write_text(WORKER)
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = []
    for r in range(2):
        log = open(tmp / f"log{r}.txt", "w")  # noqa: SIM115 (closed with the process)
        procs.append((subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(tmp), str(early),
                                        ",".join(map(str, stages))],
                                       env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # one rank failed: the other may wait forever on it
            time.sleep(0.2)
    finally:
        codes = [p.poll() for p, _ in procs]  # None: still running
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            log.close()
    tails = "\n".join(f"--- rank {r} ---\n" + (tmp / f"log{r}.txt").read_text()[-2500:] for r in range(2))
    assert codes == [0, 0], f"stages {stages}: exit codes {codes} (None: still running after {timeout:.0f}s, " \
                            f"killed; a deadlock?)\n{tails}"
    return {s: [json.loads((tmp / f"z{s}" / f"counts{r}.json").read_text()) for r in range(2)] for s in stages}


def test_a_rank_whose_rows_all_end_early_keeps_step_under_zero_2_and_3(tmp_path):
    from safetensors.torch import load_file

    from pte.pipeline.tracking import read_metrics

    weights = {}
    for stage, (early, late) in _two_ranks(tmp_path, (2, 3), early=0).items():
        assert set(early["lengths"]) == {1} and max(late["lengths"]) > 8, (early["lengths"], late["lengths"])
        assert early["prompt_len"] == late["prompt_len"]  # one prompt block, so one cache plan, on both ranks
        assert (early["forward"], early["backward"]) == (late["forward"], late["backward"]), (early, late)
        metrics = read_metrics(tmp_path / f"z{stage}" / "metrics.jsonl")
        assert len(metrics) == 2 and all(m["completions/mean_length"] == 1.0 for m in metrics)
        assert all(m["replay/max_abs_diff"] < 1e-4 and torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
        weights[stage] = load_file(str(tmp_path / f"z{stage}" / "adapter" / "adapter_model.safetensors"))
    assert weights[2].keys() == weights[3].keys()
    for k in weights[2]:
        torch.testing.assert_close(weights[3][k], weights[2][k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
