"""The study instruments record every run: a JSON line and an MLflow run in experiment ``pte-study``."""

from __future__ import annotations

import json

import pytest

from pte.study import _parse_sets, main


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
