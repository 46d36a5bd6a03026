"""The study instruments record every run: a JSON line and an MLflow run in experiment ``pte-study``."""

from __future__ import annotations

import json

import pytest

from research.study import _parse_sets, main


def test_mechanism_study_records_a_run_per_method(tmp_path, monkeypatch, one_thread):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mech.jsonl"
    assert main(["mechanism", "--methods", "pte", "lora_c", "--set", "steps=3", "--set", "eval_rows=16",
                 "--set", "pte.normalize=recursive", "--out", str(out), "--tag", "t"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["pte", "lora_c"]
    assert rows[0]["settings"] == {"steps": 3, "eval_rows": 16, "pte.normalize": "recursive"}
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and rows[0]["chance"] == 0.125
    assert len(rows[0]["curve"]) == 3  # 3 steps: one point each
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("pte-study")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == ["lora_c", "pte"]
    assert all("accuracy" in r.data.metrics for r in runs)
    history = client.get_metric_history(runs[0].info.run_id, "loss_curve")
    assert [m.step for m in history] == [0, 1, 2]


def test_bad_override_is_a_clear_error():
    with pytest.raises(ValueError, match="write key=value"):
        _parse_sets(["train.steps"])


def test_overrides_reach_nested_sections_and_moved_keys_name_their_place():
    from pte.config import load_params
    from research.study import _override

    base = load_params("presets/cpu-demo.yaml")
    with pytest.warns(UserWarning, match="`train.sft` is set but"):  # the preset's sft weights, unread by distill
        p = _override(base, _parse_sets(["train.sft.eviction_weight=100", "train.objective=distill",
                                         "train.distill.source=solutions"]))
    assert p.train.sft.eviction_weight == 100 and p.train.distill.source == "solutions"
    with pytest.raises(ValueError, match="`train.sft.eviction_weight`"):
        _override(base, _parse_sets(["train.sft_eviction_weight=33"]))


@pytest.mark.parametrize("budgets", [(), (64,)])
def test_varchain_probe_trains_and_measures_recall(tmp_path, budgets, one_thread):
    """The probe trains from a base, then reports teacher-forced recall, and greedy answers per budget (none: skip)."""
    from pte.config import params_from_dict
    from pte.data.rows import Row
    from pte.data.tasks import VarChainConfig, var_chain
    from research.study import varchain_probe

    rows = [Row(id=f"v{i}", problem=p, answer=a, source="var_chain")
            for i, (p, a) in enumerate(var_chain(VarChainConfig(steps=5, min_gap=2, min_depth=2), 0, i)
                                       for i in range(6))]
    params = params_from_dict({
        "model": {"source": "random:llama-tiny-wide"}, "cache": {"window": 16}, "adapter": {"rank": 4, "alpha": 8.0},
        "pte": {"global_tokens": 4, "extensions": {"write": "softmax", "write_context": 2}},
        "evaluate": {"max_new_tokens": 24},
        "train": {"objective": "sft", "steps": 2, "prompts_per_step": 4, "micro_batch": 4, "lr": 0.01,
                  "save_every": 100, "sft": {"recall_weight": 10.0, "recall_steps": 1}}})
    out = varchain_probe(params, "pte_no_global", "random:llama-tiny-wide", rows[:4], rows[4:], tmp_path, budgets)
    assert 0.0 <= out["tf/recall_accuracy"] <= 1.0 and out["tf/nll"] > 0 and out["eval_problems"] == 2
    assert (tmp_path / "adapter").is_dir()
    assert sorted(k for k in out if k.startswith("gen/")) == (
        [] if not budgets else ["gen/64/accuracy", "gen/64/accuracy_ci_high", "gen/64/accuracy_ci_low",
                                "gen/64/recall_accuracy"])
    if not budgets:  # the same adapter measured as an earlier run's output (--trained): the same numbers
        import shutil

        shutil.copytree(tmp_path / "adapter", tmp_path / "models" / "pte_no_global" / "adapter")
        again = varchain_probe(params, "pte_no_global", "random:llama-tiny-wide", rows[:4], rows[4:],
                               tmp_path / "unused", budgets, trained=tmp_path / "models")
        assert {k: again[k] for k in again if k.startswith("tf/")} == {k: out[k] for k in out if k.startswith("tf/")}
        assert not (tmp_path / "unused").exists()


def test_recall_by_target_groups_the_varying_target_by_the_asked_variable():
    from pte.data.sources import Row
    from pte.data.tasks import VarChainConfig, recalls, var_chain
    from research.recall_by_target import by_target

    cfg = VarChainConfig(min_depth=3)
    rows = [Row(f"v{i}", "var_chain", *var_chain(cfg, 7, i)) for i in range(40)]
    groups = by_target(rows + [Row(id="x", source="other", problem="What is 2+2?", answer="4")])
    assert set(groups) == {"c", "d"}  # min_depth 3, min_gap 4, 8 statements: the last line recalls c or d
    assert sum(map(len, groups.values())) == 40  # the row without a recall is left out
    assert all(recalls(r.problem)[0].variable == v for v, rs in groups.items() for r in rs)


@pytest.mark.parametrize("use_global_state", [False, True])
def test_state_share_measures_the_global_states_share_and_the_spread_between_problems(use_global_state, one_thread):
    """research/state_share.py: identical problems give one state (spread 0), different ones do not; S_g's share is 0
    without it; the write forms are restored afterwards."""
    from pte.config import params_from_dict
    from pte.data.rows import Row
    from pte.data.tasks import VarChainConfig, var_chain
    from pte.engine import writes
    from pte.engine.adapters import attach_adapter
    from pte.engine.inference import Generator
    from research.state_share import measure

    rows = [Row(id=f"v{i}", problem=p, answer=a, source="var_chain")
            for i, (p, a) in enumerate(var_chain(VarChainConfig(steps=5, min_gap=2, min_depth=2), 0, i)
                                       for i in range(4))]
    params = params_from_dict({
        "model": {"source": "random:llama-tiny-wide"}, "cache": {"window": 8}, "adapter": {"rank": 4, "alpha": 8.0},
        "pte": {"global_tokens": 4, "use_global_state": use_global_state,
                "extensions": {"write": "softmax", "write_context": 2}}})
    gen = Generator.load("random:llama-tiny-wide")
    attach_adapter(gen.model, "pte", params.adapter, params.pte)
    gen.model.eval()
    rebuilds = (writes.LinearWrite.rebuild, writes.SoftmaxWrite.rebuild)
    same = measure(gen.model, gen.tokenizer, [rows[0]] * 4, params)
    varied = measure(gen.model, gen.tokenizer, rows, params)
    assert (writes.LinearWrite.rebuild, writes.SoftmaxWrite.rebuild) == rebuilds
    assert same["segments"] > 0 and same["spread"] == pytest.approx(0.0, abs=1e-5)
    assert varied["spread"] > 1e-3
    if use_global_state:
        assert varied["ratio"] > 0 and -1.0 <= varied["cos_sg"] <= 1.0
    else:
        assert varied["ratio"] == 0.0 and "cos_sg" not in varied
