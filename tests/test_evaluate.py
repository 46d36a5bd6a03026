"""Evaluation: pass@k and bootstrap against hand-computed values, evaluate_policy on a tiny random model under
bounded and full caches, over-budget handling, and evaluate_all's files (metrics, samples, plots)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import pytest
import torch

from pte.config import EVAL_METHODS, AdapterConfig, EvalConfig, PTEConfig, params_from_dict
from pte.data.rows import DataConfig, Row, format_prompt
from pte.engine.adapters import METHODS, attach_adapter, save_adapter
from pte.engine.inference import Generator, encode_prompts
from pte.engine.models import load_model
from pte.pipeline.evaluate import (
    batch_seed,
    bootstrap_ci,
    evaluate_all,
    evaluate_policy,
    metrics_table,
    pass_at_k,
    plan_batches,
    summarize,
)

DATA = DataConfig(prompt_template="Q: {problem}\nA:")
ROWS = [Row("t:0", "t", "What is 2+3?", "5"), Row("t:1", "t", "Compute 7*6.", "42"),
        Row("t:2", "t", "What is 10 - 4?", "6")]
LONG = Row("t:long", "t", "A much longer problem statement that does not fit the budget. " * 3, "1")
CFG = EvalConfig(methods=("base",), budgets=(None,), num_samples=2, pass_k=(1, 2), temperature=1.0, top_p=1.0,
                 max_new_tokens=16, batch_size=4, bootstrap=200)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen():
    return Generator.load("random:llama-tiny")


def _prompt_lengths(gen, rows):
    _, mask = encode_prompts(gen.tokenizer, [format_prompt(r.problem, DATA) for r in rows])
    return mask.sum(-1).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Pure statistics


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # k > n - c: every k-subset holds a correct sample
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # no overflow for large n
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_pass_at_k_equals_subset_enumeration_and_bounds_the_naive_estimate(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            exact = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
            naive = 1 - (1 - c / n) ** k  # with replacement: biased low for k > 1
            assert pass_at_k(n, c, k) >= naive - 1e-12
            if k == 1:
                assert pass_at_k(n, c, k) == pytest.approx(naive)


def test_bootstrap_ci_reproducible_contains_mean_and_narrows():
    rng = torch.Generator().manual_seed(0)
    small = torch.bernoulli(torch.full((20,), 0.5), generator=rng).tolist()
    large = torch.bernoulli(torch.full((2000,), 0.5), generator=rng).tolist()
    a = bootstrap_ci(small, 500, 0.95, seed=1)
    assert a == bootstrap_ci(small, 500, 0.95, seed=1)
    scores = torch.rand(20, generator=rng).tolist()  # continuous: quantiles of 0/1 data coincide across seeds
    assert bootstrap_ci(scores, 500, seed=1) != bootstrap_ci(scores, 500, seed=2)
    mean = sum(small) / len(small)
    assert a[0] <= mean <= a[1]
    b = bootstrap_ci(large, 500, 0.95, seed=1)
    assert b[0] <= sum(large) / len(large) <= b[1]
    assert b[1] - b[0] < (a[1] - a[0]) / 3  # width ~ 1/sqrt(N)
    assert bootstrap_ci([0.5] * 7, 100) == (0.5, 0.5)
    assert all(math.isnan(x) for x in bootstrap_ci([], 100))


def _rec(pid, correct, length=10, finished=True, evictions=0, completion=""):
    return {"id": pid, "correct": correct, "length": length, "finished": finished, "evictions": evictions,
            "completion": completion}


def test_summarize_handmade_records():
    records = [_rec("a", True, 10, True, 0, "x=1\n\\boxed{1}"), _rec("a", False, 20, False, 2, "boxed{2} 2"),
               _rec("b", False, 30, False, 4), _rec("b", False, 40, True, 2, "\\boxed{3}")]
    m = summarize(records, pass_k=(1, 2, 3), n_resamples=100, seed=0)
    assert m["accuracy"] == pytest.approx(0.25)  # problem a: 1/2, problem b: 0/2
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx(0.5)  # a: 1, b: 0
    assert "pass@3" not in m  # needs 3 samples per problem
    assert m["mean_length"] == 25 and m["truncation_rate"] == 0.5 and m["evictions_per_sample"] == 2
    assert m["num_problems"] == 2 and m["num_samples"] == 4
    assert m["median_length"] == 25 and m["boxed_rate"] == 0.5  # "boxed{" without the backslash does not count
    assert m["mixed_groups"] == 0.5  # a is mixed (1 of 2), b is all wrong
    assert 0.0 <= m["accuracy_ci_low"] <= 0.25 <= m["accuracy_ci_high"] <= 0.5
    empty = summarize([])
    assert empty["accuracy"] is None and empty["accuracy_ci_low"] is None and empty["num_problems"] == 0


def test_plan_batches_and_seeds():
    batches, over = plan_batches([5, 9, 3, 12, 9], budget=10, problems_per_batch=2)
    assert over == [3]
    assert batches == [[2, 0], [1, 4]]  # by prompt length, whole problems; every block < budget
    assert plan_batches([5, 9], None, 8) == ([[0, 1]], [])
    assert batch_seed(0, 64, 1) == batch_seed(0, 64, 1)
    assert len({batch_seed(0, 64, 1), batch_seed(0, 64, 2), batch_seed(0, None, 1), batch_seed(1, 64, 1)}) == 4


def test_eval_config_yaml_and_validation():
    assert EVAL_METHODS is METHODS  # one definition, pte.config.methods
    params = params_from_dict({"evaluate": {"methods": ["base", "pte"], "budgets": [None, 192, 128],
                                            "num_samples": 4, "pass_k": [1, 4]}})
    assert params.evaluate.budgets == (None, 192, 128)
    assert params_from_dict(params.to_dict()) == params
    assert params.cache.for_budget(None).is_full and params.cache.for_budget(128).budget == 128
    assert not params.cache.for_budget(128).compile_decode
    assert params_from_dict({"cache": {"compile_decode": True}}).cache.for_budget(128).compile_decode
    assert params.evaluate.long_threshold() == math.ceil(0.2 * 256)
    for bad, needle in [({"pass_k": [8]}, "evaluate.pass_k"), ({"methods": ["gpt"]}, "evaluate.methods"),
                        ({"budgets": [1]}, "evaluate.budgets"), ({"budgets": [64, 64]}, "evaluate.budgets"),
                        ({"ci": 1.0}, "evaluate.ci")]:
        with pytest.raises(ValueError, match=needle):
            params_from_dict({"evaluate": bad})


def test_metrics_table():
    m = {"accuracy": 0.5, "accuracy_ci_low": 0.4, "accuracy_ci_high": 0.6, "over_budget": 0, "ci_level": 0.95}
    table = metrics_table({"base": {"full": m, "64": {**m, "over_budget": 1}}, "summary": {"x": 1.0}})
    assert "| method | full cache | C = 64 |" in table
    assert "| base | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] (1 over budget) |" in table
    assert "summary" not in table.split("\n\n")[0]


# ----------------------------------------------------------------------------------------------------------------------
# On a tiny random model


def test_evaluate_policy_bounded_evicts_full_does_not(gen):
    budget = max(_prompt_lengths(gen, ROWS)) + 4  # a 4-slot thinking window at most: evictions in 16 tokens
    full, full_recs = evaluate_policy(gen, ROWS, None, CFG, DATA, seed=0, progress=False)
    bounded, recs = evaluate_policy(gen, ROWS, budget, CFG, DATA, seed=0, progress=False)
    assert full["evictions_per_sample"] == 0 and bounded["evictions_per_sample"] > 0
    assert len(recs) == len(full_recs) == len(ROWS) * CFG.num_samples
    assert [(r["id"], r["sample"]) for r in recs] == [(row.id, j) for row in ROWS for j in range(CFG.num_samples)]
    assert bounded["truncation_rate"] == pytest.approx(sum(not r["finished"] for r in recs) / len(recs))
    assert bounded["mean_length"] == pytest.approx(sum(r["length"] for r in recs) / len(recs))
    assert all(r["prompt_block"] + r["window"] == budget for r in recs)
    assert all(r["window"] is None and r["evictions"] == 0 for r in full_recs)
    assert bounded["kv_cache_peak_bytes"] < full["kv_cache_peak_bytes"]
    assert bounded["over_budget"] == 0 and bounded["num_problems"] == len(ROWS)
    assert set(bounded) >= {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "pass@1", "pass@2", "peak_memory_bytes",
                            "process_peak_rss_bytes", "seconds"}
    from pte.data.rewards import score

    assert all(r["correct"] == (score(r["completion"], r["answer"]) == 1.0) for r in recs)


def test_evaluate_policy_is_deterministic_in_the_seed(gen):
    budget = max(_prompt_lengths(gen, ROWS)) + 6
    _, a = evaluate_policy(gen, ROWS, budget, CFG, DATA, seed=3, progress=False)
    _, b = evaluate_policy(gen, ROWS, budget, CFG, DATA, seed=3, progress=False)
    _, c = evaluate_policy(gen, ROWS, budget, CFG, DATA, seed=4, progress=False)
    assert a == b
    assert [r["completion"] for r in a] != [r["completion"] for r in c]


def test_prompt_longer_than_budget_is_over_budget_not_wrong(gen, caplog):
    rows = [*ROWS, LONG]
    lengths = _prompt_lengths(gen, rows)
    budget = max(lengths[:-1]) + 4
    assert lengths[-1] >= budget
    with caplog.at_level(logging.WARNING, logger="pte.pipeline.evaluate"):
        m, recs = evaluate_policy(gen, rows, budget, CFG, DATA, seed=0, progress=False)
    assert m["over_budget"] == 1 and m["over_budget_ids"] == ["t:long"]
    assert m["num_problems"] == len(ROWS) and "t:long" not in {r["id"] for r in recs}
    assert "over_budget, not counted as wrong" in caplog.text and "t:long" in caplog.text
    none_fit, recs = evaluate_policy(gen, rows, 3, CFG, DATA, seed=0, progress=False)
    assert none_fit["over_budget"] == len(rows) and recs == [] and none_fit["accuracy"] is None


def _pte_adapter(path):
    model, _ = load_model("random:llama-tiny")
    acfg, pcfg = AdapterConfig(rank=4), PTEConfig(global_tokens=4)
    attach_adapter(model, "pte", acfg, pcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pte_up" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    return save_adapter(model, path, "pte", acfg, pcfg, base_model="random:llama-tiny")


def test_evaluate_all_writes_metrics_samples_and_plots(gen, tmp_path):
    adapter = _pte_adapter(tmp_path / "pte")
    budget = max(_prompt_lengths(gen, ROWS)) + 4
    cfg = dataclasses.replace(CFG, methods=("base", "pte"), budgets=(None, budget))
    out = tmp_path / "eval"
    report = evaluate_all("random:llama-tiny", {"base": None, "pte": adapter}, ROWS, cfg, DATA, out, seed=0,
                          device="cpu", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == report
    for method in ("base", "pte"):
        assert set(metrics[method]) == {"full", str(budget)}
        assert metrics[method][str(budget)]["evictions_per_sample"] > 0
        assert f"{method}/full/accuracy" in metrics["summary"] and f"{method}/mean_accuracy" in metrics["summary"]
        for label in ("full", str(budget)):
            lines = (out / "samples" / f"{method}_{label}.jsonl").read_text().splitlines()
            assert len(lines) == len(ROWS) * cfg.num_samples
            assert json.loads(lines[0])["method"] == method
    base_text = (out / "samples" / f"base_{budget}.jsonl").read_text()
    assert base_text != (out / "samples" / f"pte_{budget}.jsonl").read_text().replace('"pte"', '"base"')
    for name in ("accuracy_vs_budget", "kv_memory_vs_length", "response_length_hist"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        points = json.loads((out / "plots" / f"{name}.json").read_text())
        assert isinstance(points, list) and points and all(isinstance(p, dict) for p in points)
    kv = json.loads((out / "plots" / "kv_memory_vs_length.json").read_text())
    last = {p["budget"]: p["kv_mib"] for p in kv if p["kind"] != "sample"}  # the value at max_new_tokens
    assert last[str(budget)] < last["full"]
    assert json.loads((out / "over_budget.json").read_text()) == {"full": [], str(budget): []}
    assert "| pte |" in (out / "metrics.md").read_text()


def test_evaluate_all_rejects_bad_adapter_mapping(tmp_path):
    cfg = dataclasses.replace(CFG, methods=("base", "pte"))
    with pytest.raises(ValueError, match="no adapter directory was given for it"):
        evaluate_all("random:llama-tiny", {"base": None}, ROWS, cfg, DATA, tmp_path, seed=0, progress=False)
    adapter = _pte_adapter(tmp_path / "pte")
    cfg = dataclasses.replace(CFG, methods=("lora",))
    with pytest.raises(ValueError, match="holds method 'pte'"):
        evaluate_all("random:llama-tiny", {"lora": adapter}, ROWS, cfg, DATA, tmp_path, seed=0, progress=False)


def test_per_dataset_protocol_on_the_smoke_preset(tmp_path):
    """``evaluate.protocols``: each source gets its own samples and pass@k, the budget's accuracy is their mean (the
    paper's "Avg"), and nothing measured (time, memory) reaches metrics.json."""
    import yaml

    from pte.data.sources import load_source

    raw = yaml.safe_load(open("presets/smoke.yaml"))
    raw["data"]["eval"].append({"name": "var_chain", "count": 2, "seed": 5, "kwargs": {"steps": 5, "min_gap": 2,
                                                                                      "min_depth": 2}})
    raw["evaluate"].update(methods=["base"], budgets=[None], protocols={"var_chain": {"num_samples": 4,
                                                                                         "pass_k": [1, 4]}})
    params = params_from_dict(raw)
    rows = [r for spec in params.data.eval for r in load_source(spec)]
    cfg = dataclasses.replace(params.evaluate, max_new_tokens=8)
    report = evaluate_all("random:llama-tiny", {"base": None}, rows, cfg, params.data, tmp_path, seed=0,
                          progress=False)
    full = report["base"]["full"]
    chain, var = full["datasets"]["reasoning_gym:chain_sum"], full["datasets"]["var_chain"]
    assert (chain["num_samples"], var["num_samples"]) == (3 * 2, 2 * 4)  # problems x that source's samples
    assert "pass@4" in var and "pass@4" not in chain
    assert full["accuracy"] == pytest.approx((chain["accuracy"] + var["accuracy"]) / 2)
    assert full["num_problems"] == 5 and full["accuracy_ci_low"] is None
    saved = (tmp_path / "metrics.json").read_text()
    assert '"seconds"' not in saved and '"peak_memory_bytes"' not in saved
    with pytest.raises(ValueError, match="not sources of `data.eval`"):
        params_from_dict({**raw, "evaluate": {**raw["evaluate"], "protocols": {"aime24": {"num_samples": 16}}}})


def test_the_paper_preset_evaluates_aime_at_pass_16_and_the_rest_at_pass_1_of_5():
    from pte.config import load_params

    ev = load_params("presets/paper.yaml").evaluate
    assert (ev.num_samples, ev.pass_k) == (5, (1,))
    for src in ("aime24", "aime25"):
        assert ev.for_source(src).num_samples == 16 and 16 in ev.for_source(src).pass_k
    for src in ("math500", "olympiadbench", "minerva_math", "amc23"):
        assert (ev.for_source(src).num_samples, ev.for_source(src).pass_k) == (5, (1,))
