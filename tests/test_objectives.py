"""sft and distill through the segment-wise replay: they learn, the teacher is the full-cache base, memory stays
bounded by one chunk, and GRPO can start from their adapters."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pte.config import AdapterConfig, PTEConfig, params_from_dict
from pte.data.tasks import VarChainConfig, recall_spans, var_chain, worked_solution
from pte.engine.adapters import attach_adapter
from pte.engine.cache import CachePlan
from pte.engine.replay import replay_chunks
from pte.pipeline.tracking import read_metrics
from pte.training.objectives import (
    FullCacheTeacher,
    completion_tokens,
    jsd_loss,
    recall_positions,
    sft_chunk,
    sft_token_weights,
    sft_weights,
)
from pte.training.train import Trainer, train
from tests.conftest import batch, tiny

ROWS = [var_chain(VarChainConfig(steps=5, min_gap=2, min_depth=2), 0, i) for i in range(8)]
PROBLEMS = [p for p, _ in ROWS]
ANSWERS = [a for _, a in ROWS]
SOLUTIONS = [worked_solution("var_chain", p) for p in PROBLEMS]


def params(objective: str, sft: dict | None = None, distill: dict | None = None, **train_kw):
    """Tiny-model params for ``objective``; ``sft`` / ``distill``: that objective's subsection."""
    train_cfg = {"steps": 6, "prompts_per_step": 4, "micro_batch": 4, "lr": 0.01, "save_every": 100,
                 "objective": objective, **train_kw}
    if objective != "sft" and not (objective == "distill" and (distill or {}).get("source") == "solutions"):
        train_cfg["rollout"] = {"num_generations": 2, "max_completion_length": 24, "batch": 8}
    if objective == "grpo":
        train_cfg["grpo"] = {"reward": "char_match", "beta": 0.0}
    for name, section in (("sft", sft), ("distill", distill)):
        if section is not None:
            train_cfg[name] = section
    return params_from_dict({
        "model": {"source": "random:llama-tiny-wide"}, "cache": {"window": 16}, "adapter": {"rank": 4, "alpha": 8.0},
        "pte": {"global_tokens": 4}, "train": train_cfg})


def test_recall_positions_mark_the_recalled_digits():
    _, tok = tiny("llama-tiny")
    tokens, mask = completion_tokens(tok, SOLUTIONS[:2], tok.eos_token_id, tok.pad_token_id)
    pos = recall_positions(tok, PROBLEMS[:2], SOLUTIONS[:2], tokens.shape[1])
    for b in range(2):
        (lo, hi), = recall_spans(PROBLEMS[b], SOLUTIONS[b])
        assert tok.decode(tokens[b][pos[b]]) == SOLUTIONS[b][lo:hi]
        assert int(mask[b].sum()) == len(tok(SOLUTIONS[b], add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("method", ["pte", "lora_c", "lora"])
def test_sft_lowers_the_solution_nll_and_reports_recall(tmp_path, method, one_thread):
    last = train(params("sft"), method, PROBLEMS, ANSWERS, tmp_path, progress=False, problems=PROBLEMS,
                 solutions=SOLUTIONS)
    hist = read_metrics(tmp_path / "metrics.jsonl")
    assert len(hist) == 6 and hist[-1]["loss"] < hist[0]["loss"] * 0.8, [h["loss"] for h in hist]
    assert 0.0 <= last["recall/token_accuracy"] <= 1.0 and last["recall/nll"] > 0


def test_sft_recall_weight_makes_a_weighted_token_mean():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    recall = torch.zeros(3, 5, dtype=torch.bool)
    recall[0, 2] = recall[2, 4] = recall[1, 4] = True  # (1, 4) is padding: never counted
    for w in (1.0, 7.0, 0.0):
        weights = sft_weights(mask, recall, w)
        loss, sums = sft_chunk(lp, logits, tokens, mask, recall, float(weights.sum()), weights)
        nll = -lp[mask.bool()]
        rec = -torch.stack([lp[0, 2], lp[2, 4]])
        expected = (nll.sum() + (w - 1.0) * rec.sum()) / (mask.sum() + (w - 1.0) * 2)
        torch.testing.assert_close(loss, expected)
        assert sums[0] == pytest.approx(float(nll.sum()), rel=1e-6) and sums[3] == 2  # counts stay unweighted
    assert torch.equal(sft_weights(mask, recall, 1.0), mask.float())


def test_cosine_schedule_and_recall_phase_reach_the_optimizer(tmp_path, monkeypatch, one_thread):
    """The schedule is the half cosine of ``transformers``' cosine schedule; the lr each step sets is the one the
    optimizer DeepSpeed drives uses, and the recall weight drops to ``sft.recall_weight_after`` (default 1) after
    ``sft_recall_steps``."""
    import transformers

    import pte.training.train as pt
    from pte.config.training import learning_rate, recall_weight

    cfg = params("sft", steps=4, lr_schedule="cosine", lr=0.01, sft={"recall_steps": 2, "recall_weight": 50.0}).train
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 0, cfg.steps)
    for step in range(cfg.steps):
        assert learning_rate(cfg, step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        opt.step()
        sched.step()
    assert learning_rate(dataclasses.replace(cfg, lr_schedule="constant"), 3) == cfg.lr
    wsd = dataclasses.replace(cfg, steps=9, lr_decay_steps=4)
    sched = transformers.get_wsd_schedule(opt, num_warmup_steps=0, num_decay_steps=4, num_training_steps=9)
    for step in range(wsd.steps):
        assert learning_rate(wsd, step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        opt.step()
        sched.step()
    assert learning_rate(wsd, 4) == cfg.lr and learning_rate(wsd, 6) < cfg.lr
    with pytest.raises(ValueError, match="lr_decay_steps"):
        params("sft", lr_decay_steps=3)  # needs the cosine schedule
    with pytest.raises(ValueError, match="lr_decay_steps"):
        params("sft", lr_schedule="cosine", lr_decay_steps=7)  # more than train.steps (6)
    assert [recall_weight(cfg, s) for s in range(4)] == [50.0, 50.0, 1.0, 1.0]
    assert recall_weight(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, recall_steps=None)), 3) == 50.0
    assert [recall_weight(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, recall_weight_after=10.0)), s)
            for s in range(4)] == [
        50.0, 50.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="train.sft.recall_weight_after"):
        params("sft", sft={"recall_weight_after": -1.0})

    seen_lr, seen_w = [], []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        seen_lr.append(self.param_groups[0]["lr"]), adamw_step(self, *a, **k))[1])
    monkeypatch.setattr(pt, "sft_weights", lambda m, r, w: (seen_w.append(w), sft_weights(m, r, w))[1])
    p = params("sft", steps=4, lr_schedule="cosine", lr=0.01, sft={"recall_steps": 2, "recall_weight": 50.0})
    train(p, "pte", PROBLEMS, ANSWERS, tmp_path, progress=False, problems=PROBLEMS, solutions=SOLUTIONS)
    assert seen_lr == pytest.approx([learning_rate(cfg, s) for s in range(4)])
    assert seen_w == [50.0, 50.0, 1.0, 1.0]
    assert [h["lr"] for h in read_metrics(tmp_path / "metrics.jsonl")] == pytest.approx(seen_lr)


def test_sft_without_solutions_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a worked solution"):
        Trainer(params("sft"), "pte", PROBLEMS, ANSWERS, tmp_path)


def test_teacher_is_the_adapter_free_full_cache_model_chunk_by_chunk(one_thread):
    model, tok = tiny("llama-tiny")
    model = attach_adapter(model, "pte", AdapterConfig(rank=4, alpha=8.0), PTEConfig(global_tokens=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "pte_up" in n:
                p.normal_()  # a non-trivial adapter, which the teacher must not use
    ids, pmask = batch(tok)
    tokens = torch.randint(0, 250, (ids.shape[0], 20))
    plan = CachePlan(ids.shape[1], 8, 2)
    teacher = FullCacheTeacher(model, ids, pmask, tokens)
    got = torch.cat([teacher.logits(slice(0 if k == 0 else a + 1, b + 1))
                     for k, (a, b, _) in enumerate(replay_chunks(plan, tokens.shape[1]))], dim=1)
    base, _ = tiny("llama-tiny")
    full_ids = torch.cat([ids, tokens[:, :-1]], dim=1)
    full_mask = torch.cat([pmask, torch.ones_like(tokens[:, :-1])], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = base(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits[:, ids.shape[1] - 1:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_jsd_loss_is_the_token_mean_kl_of_eq3():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ls, lt = F.log_softmax(s / 0.7, -1), F.log_softmax(t / 0.7, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)  # KL(student || teacher) per position
    ref = (kl * mask).sum() / 8.0
    torch.testing.assert_close(jsd_loss(s, t, mask, 1.0, 8.0, 0.7), ref)
    assert float(jsd_loss(s, s, mask, 0.5, 8.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_of_a_fresh_full_cache_adapter_is_zero_and_bounded_methods_learn(tmp_path, one_thread):
    """A fresh adapter *is* the base, so with a full cache the student equals the teacher: divergence 0."""
    last = train(params("distill", steps=1), "lora", PROBLEMS, ANSWERS, tmp_path / "lora", progress=False)
    assert last["distill/divergence"] == pytest.approx(0.0, abs=1e-6)
    train(params("distill", steps=6), "pte", PROBLEMS, ANSWERS, tmp_path / "pte", progress=False,
          problems=PROBLEMS)
    hist = read_metrics(tmp_path / "pte" / "metrics.jsonl")
    assert hist[0]["distill/divergence"] > 0 and "recall/accuracy" in hist[0]


@pytest.mark.parametrize("objective", ["sft", "distill"])
def test_no_saved_vocabulary_tensor_spans_more_than_one_chunk(tmp_path, objective, one_thread):
    """Saved-tensor hooks see every activation autograd keeps: none with the vocabulary as last dimension covers
    more positions than the widest replay chunk (P + e), so memory is bounded by one segment, not the sequence."""
    p = params(objective, steps=1, micro_batch=8, prompts_per_step=8 if objective == "sft" else 4)
    trainer = Trainer(p, "pte", PROBLEMS, ANSWERS, tmp_path, problems=PROBLEMS, solutions=SOLUTIONS)
    vocab = trainer.model.config.vocab_size
    widest = []

    def pack(x):
        if x.requires_grad and x.dim() == 3 and x.shape[-1] == vocab:  # [B, n, V] activations, not frozen weights
            widest.append(x.shape[-2])
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        trainer.train_step()
    window, evict = 16, 4
    longest_completion = 60  # var_chain solutions here are shorter: any whole-sequence tensor would exceed a chunk
    assert widest and max(widest) <= max(window, evict) + 1 < longest_completion


def test_grpo_starts_from_an_sft_adapter(tmp_path, one_thread):
    from safetensors.torch import load_file

    train(params("sft", steps=2), "pte", PROBLEMS, ANSWERS, tmp_path / "sft", progress=False, problems=PROBLEMS,
          solutions=SOLUTIONS)
    saved = load_file(str(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"))
    trainer = Trainer(params("grpo", init_adapter=str(tmp_path / "sft" / "adapter")), "pte", PROBLEMS, ANSWERS,
                      tmp_path / "grpo")
    got = dict(trainer.model.named_parameters())
    for k, v in saved.items():
        torch.testing.assert_close(got[k].detach(), v)
    with pytest.raises(ValueError, match="holds a 'pte' adapter, not 'lora_c'"):
        Trainer(params("grpo", init_adapter=str(tmp_path / "sft" / "adapter")), "lora_c", PROBLEMS, ANSWERS,
                tmp_path / "bad")
    assert dataclasses.asdict(trainer.params.train)["init_adapter"]


def test_k3_is_an_unbiased_estimate_of_the_exact_kl():
    """E_{y ~ p}[k3(y)] = KL(p || q): the exact term is what GRPO's k3 KL estimates, per position."""
    from pte.training.grpo import per_token_kl
    from pte.training.objectives import token_kl

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 3, 7, generator=g), torch.randn(1, 3, 7, generator=g)
    exact = token_kl(s, t)  # [1, 3]
    ls, lt = F.log_softmax(s, -1)[0], F.log_softmax(t, -1)[0]
    draws = torch.multinomial(ls.exp(), 200_000, replacement=True, generator=g)  # [3, N]
    k3 = per_token_kl(ls.gather(1, draws), lt.gather(1, draws)).mean(1)
    torch.testing.assert_close(k3, exact[0], atol=5e-3, rtol=2e-2)


def test_exact_kl_replaces_k3_in_the_token_objective():
    from pte.training.grpo import GRPOLossConfig, per_token_objective

    g = torch.Generator().manual_seed(2)
    lp, old, ref = (torch.randn(2, 4, generator=g) * 0.1 - 1 for _ in range(3))
    adv, mask, kl = torch.tensor([1.0, -1.0]), torch.ones(2, 4), torch.rand(2, 4, generator=g)
    cfg = GRPOLossConfig(beta=0.5)
    no_kl, _ = per_token_objective(lp, old, None, adv, mask, GRPOLossConfig(beta=0.0))
    got, st = per_token_objective(lp, old, ref, adv, mask, cfg, exact_kl=kl)
    torch.testing.assert_close(got, no_kl + 0.5 * kl)
    torch.testing.assert_close(st.kl, kl.sum(-1))


def test_grpo_with_the_exact_kl_trains_and_is_zero_for_a_fresh_full_cache_adapter(tmp_path, one_thread):
    p = params("grpo", steps=1)
    p = dataclasses.replace(p, train=dataclasses.replace(
        p.train, grpo=dataclasses.replace(p.train.grpo, beta=0.1, kl_estimator="exact")))
    last = train(p, "lora", PROBLEMS, ANSWERS, tmp_path / "lora", progress=False)
    assert last["kl"] == pytest.approx(0.0, abs=1e-6)
    last = train(dataclasses.replace(p, train=dataclasses.replace(p.train, steps=3)), "pte", PROBLEMS, ANSWERS,
                 tmp_path / "pte", progress=False)
    assert last["kl"] > 0 and last["replay/max_abs_diff"] < 1e-4


def test_distill_on_solutions_is_zero_where_the_cache_is_full_and_teaches_bounded_methods(tmp_path, one_thread):
    """Teacher-forced distillation on worked solutions: with a full cache a fresh adapter equals its teacher (zero
    divergence); under a bounded cache the divergence is positive and the reported loss is the divergence plus
    ``train.distill.nll_weight`` times the NLL."""
    kw = {"distill": {"source": "solutions"}}
    first = Trainer(params("distill", steps=1, **kw), "lora", PROBLEMS, ANSWERS, tmp_path / "lora",
                    problems=PROBLEMS, solutions=SOLUTIONS).train_step()
    assert first["distill/divergence"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == first["distill/divergence"]
    train(params("distill", steps=3, distill={"source": "solutions", "nll_weight": 0.5}), "pte", PROBLEMS, ANSWERS,
          tmp_path / "pte", progress=False, problems=PROBLEMS, solutions=SOLUTIONS)
    hist = read_metrics(tmp_path / "pte" / "metrics.jsonl")
    assert hist[0]["distill/divergence"] > 0 and "recall/nll" in hist[0]
    for h in hist:
        assert h["loss"] == pytest.approx(h["distill/divergence"] + 0.5 * h["nll"], rel=1e-6)
    with pytest.raises(ValueError, match="needs a worked solution"):
        Trainer(params("distill", **kw), "pte", PROBLEMS, ANSWERS, tmp_path / "none")
    with pytest.raises(ValueError, match="train.distill.nll_weight"):
        params("distill", distill={"nll_weight": 1.0})


def test_eviction_sensitivity_is_the_frozen_base_nll_gap_and_zero_without_eviction(one_thread):
    """``log p_full - log p_bounded`` of the adapter-off model, teacher-forced; 0 on padding and when nothing is
    evicted (the full cache computed independently: one cache-free forward of prompt + completion)."""
    from pte.engine.adapters import adapters_disabled
    from pte.engine.cache import plan_cache
    from pte.engine.inference import encode_prompts
    from pte.engine.replay import replay_logprobs
    from pte.training.objectives import eviction_sensitivity

    model, tok = tiny("llama-tiny-wide")
    model = attach_adapter(model, "pte", AdapterConfig(rank=4, alpha=8.0), PTEConfig(global_tokens=4))
    ids, pmask = encode_prompts(tok, PROBLEMS[:3])
    tokens, mask = completion_tokens(tok, SOLUTIONS[:3], tok.eos_token_id, tok.pad_token_id)
    plan = plan_cache(params("sft").cache, ids.shape[1])
    sens = eviction_sensitivity(model, ids, pmask, tokens, mask, plan)
    with torch.no_grad(), adapters_disabled(model):
        bounded = replay_logprobs(model, ids, pmask, tokens, mask, plan)
        seq = torch.cat([ids, tokens], 1)
        full_mask = torch.cat([pmask, torch.ones_like(tokens)], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=full_mask, position_ids=pos).logits[:, ids.shape[1] - 1 : -1]
        full = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(sens, (full - bounded) * mask, atol=1e-4, rtol=0)
    assert float((sens * (1 - mask)).abs().sum()) == 0 and sens.abs().max() > 1e-3
    wide = plan_cache(dataclasses.replace(params("sft").cache, window=512), ids.shape[1])
    assert eviction_sensitivity(model, ids, pmask, tokens, mask, wide).abs().max() < 1e-4
    # a full cache: exactly 0 (the same forward twice), so the weights skip it and stay what they were
    full_plan = plan_cache(dataclasses.replace(params("sft").cache, window=None), ids.shape[1])
    assert full_plan.window is None and not eviction_sensitivity(model, ids, pmask, tokens, mask, full_plan).any()
    rows = SimpleNamespace(prompt_ids=ids, prompt_mask=pmask, tokens=tokens, mask=mask, recall=torch.zeros_like(mask))
    weights = mask.float()
    same, agreement = sft_token_weights(None, rows, full_plan, weights, 33.0, 2)  # None: the model is never called
    assert same is weights and agreement is None
    # proportional (tau None): 1 + alpha * max(0, s); a selection (tau): 1 + alpha exactly where s > tau, else 1
    prop, _ = sft_token_weights(model, rows, plan, weights, 33.0, 2)
    torch.testing.assert_close(prop, mask + 33.0 * sens.clamp(min=0.0), atol=4e-3, rtol=0)
    tau = float(sens[mask.bool()].quantile(0.8))
    chosen, _ = sft_token_weights(model, rows, plan, weights, 99.0, 2, threshold=tau)
    assert set(chosen[mask.bool()].unique().tolist()) == {1.0, 100.0}
    assert torch.equal(chosen == 100.0, (sens > tau) & mask.bool())


def test_label_agreement_counts_by_hand():
    from pte.training.objectives import label_agreement

    sens = torch.tensor([[0.1, 2.0, 0.9, 0.0], [0.7, 0.2, 0.1, 3.0], [0.0, 0.0, 0.0, 0.0]])
    recall = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])  # row 1's 3.0 is padding
    # rows with a recall: 2, top is a recall in both; above 0.5: 2.0, 0.9, 0.7 -> 2 of them recalls; 2 recalls
    assert label_agreement(sens, recall, mask).tolist() == [2.0, 2.0, 3.0, 2.0, 2.0]


def test_eviction_weighted_sft_logs_its_agreement_and_stops_after_its_steps(tmp_path, one_thread):
    """``sft_eviction_weight`` weighs tokens by the base's own eviction sensitivity for ``sft_eviction_steps`` steps;
    the recall label only measures how well that finds the recall tokens."""
    from pte.config.training import eviction_weight

    p = params("sft", steps=3, sft={"eviction_weight": 30.0, "eviction_steps": 2})
    assert [eviction_weight(p.train, s) for s in range(3)] == [30.0, 30.0, 0.0]
    assert eviction_weight(dataclasses.replace(p.train, objective="distill"), 0) == 0.0  # sft only
    train(p, "pte", PROBLEMS, ANSWERS, tmp_path, progress=False, problems=PROBLEMS, solutions=SOLUTIONS)
    hist = read_metrics(tmp_path / "metrics.jsonl")
    assert hist[0]["eviction/weight_mean"] > 1.0 and 0.0 <= hist[0]["eviction/recall"] <= 1.0
    assert "eviction/recall_is_top" in hist[0] and "eviction/weight_mean" not in hist[2]
    with pytest.raises(ValueError, match="train.sft.eviction_weight"):
        params("sft", sft={"eviction_weight": -1.0})


@pytest.mark.parametrize("method", ["lora_c", "pte"])
def test_precomputed_sensitivity_is_the_loops_bits(tmp_path, one_thread, monkeypatch, method):
    """The sensitivity stage's tensors (computed once, on the plain base) are the bits each trainer computes in its
    loop with its adapter off, so training with the file gives the same weights, with no sensitivity computed in the
    loop; rows other than the file's are computed as before."""
    from safetensors.torch import load_file

    from pte.training import objectives
    from pte.training.sensitivity import compute_sensitivities, load_sensitivities, weighted_steps

    p = params("sft", steps=3, sft={"eviction_weight": 30.0, "eviction_steps": 2})
    assert weighted_steps(p) == 2 and weighted_steps(params("sft")) == 0
    path = tmp_path / "sensitivity.safetensors"
    assert compute_sensitivities(p, PROBLEMS, PROBLEMS, SOLUTIONS, path, progress=False) == {"steps": 2, "rows": 8}
    pre = load_sensitivities(path)
    assert sorted(pre) == [0, 1] and all(s.abs().max() > 1e-3 for _, s in pre.values())

    calls = []
    compute = objectives.eviction_sensitivity
    monkeypatch.setattr(objectives, "eviction_sensitivity", lambda *a: calls.append(1) or compute(*a))
    train(p, method, PROBLEMS, ANSWERS, tmp_path / "loop", progress=False, problems=PROBLEMS, solutions=SOLUTIONS)
    in_loop = len(calls)
    train(p, method, PROBLEMS, ANSWERS, tmp_path / "read", progress=False, problems=PROBLEMS, solutions=SOLUTIONS,
          sensitivity=path)
    assert in_loop == 2 and len(calls) == in_loop  # one micro-batch per weighted step, none when read
    weights = [load_file(str(next((tmp_path / run / "adapter").glob("*.safetensors")))) for run in ("loop", "read")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["loss"] for r in read_metrics(tmp_path / "loop" / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(tmp_path / "read" / "metrics.jsonl")]
    other = dataclasses.replace(p, base=dataclasses.replace(p.base, seed=1))  # other rows: computed in the loop
    train(other, method, PROBLEMS, ANSWERS, tmp_path / "seed1", progress=False, problems=PROBLEMS,
          solutions=SOLUTIONS, sensitivity=path)
    assert len(calls) == 2 * in_loop
