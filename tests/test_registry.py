"""Registry: metric selection, champion / challenger promotion, and the pyfunc predictor under the bounded cache,
logged from code (no pickle) and phrasing bare problems as training does.

Offline: a tiny random Llama saved as an HF directory, a fresh PTE adapter, a temporary sqlite tracking store.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pte.config import (
    AdapterConfig,
    CacheConfig,
    PTEConfig,
    RegistryConfig,
    SamplingConfig,
    TrackingConfig,
)
from pte.data.rows import DataConfig, format_prompt
from pte.pipeline.registry import CHALLENGER, CHAMPION, load_champion, register, select_metric

CACHE = CacheConfig(window=8, evict_ratio=0.25)
SAMPLING = SamplingConfig(max_new_tokens=24, temperature=0.0)


def _metrics(acc_64: float) -> dict:
    """The evaluate stage's metrics.json shape: {method: {budget: metrics}} plus a flat summary."""
    return {"pte": {"full": {"accuracy": 0.9}, "64": {"accuracy": acc_64}, "128": {"accuracy": 0.8}},
            "lora": {"64": {"accuracy": 0.99}}, "summary": {"pte/64/accuracy": acc_64, "pte/accuracy_mean": 0.7}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> tuple[Path, Path]:
    """(base HF directory, fresh PTE adapter directory)."""
    from pte.engine.adapters import attach_adapter, save_adapter
    from pte.engine.models import load_model, save_hf

    root = tmp_path_factory.mktemp("policy")
    model, tok = load_model("random:llama-tiny")
    base = save_hf(model, tok, root / "base")
    model = attach_adapter(model, "pte", AdapterConfig(rank=4), PTEConfig(global_tokens=4))
    adapter = save_adapter(model, root / "adapter", "pte", AdapterConfig(rank=4), PTEConfig(global_tokens=4),
                           base_model="random:llama-tiny")
    return base, adapter


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> TrackingConfig:
    """One sqlite store for the module (models get distinct names), copied from the session's migrated template."""
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    root = tmp_path_factory.mktemp("mlflow")
    shutil.copy(template, root / "mlflow.db")
    return TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_location=str(root / "artifacts"))


def test_select_metric_reads_the_evaluate_stage_metrics():
    m = _metrics(0.5)
    assert select_metric(m, "accuracy", "min", "pte") == (0.5, "64")
    assert select_metric(m, "accuracy", "full", "pte") == (0.9, "full")
    assert select_metric(m, "accuracy", "128", "pte") == (0.8, "128")
    assert select_metric(m, "accuracy", "min", "lora") == (0.99, "64")
    assert select_metric({"pte": {"32": {"pass@4": 0.3}, "full": {"pass@4": 0.6}}}, "pass@4") == (0.3, "32")
    assert select_metric({"pte": {"256": {"accuracy": None}, "512": {"accuracy": 0.2}}}, "accuracy") == (0.2, "512")
    with pytest.raises(ValueError, match="registry.metric"):
        select_metric(m, "f1", "min", "pte")
    with pytest.raises(ValueError, match="registry.budget.*'64', '128', 'full'"):
        select_metric(m, "accuracy", "32", "pte")
    with pytest.raises(ValueError, match=r"no method 'lora_c'; methods there: \['lora', 'pte'\]"):
        select_metric(m, "accuracy", "64", "lora_c")


def _alias_version(tracking: TrackingConfig, name: str, alias: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)
    return str(client.get_model_version_by_alias(name, alias).version)


def test_champion_challenger_and_bounded_predictor(policy, tracking, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pte.engine.inference import Generator, encode_prompts

    base, adapter = policy
    cfg = RegistryConfig(model_name="pte-tiny", budget="min")
    kw = dict(cfg=cfg, tracking=tracking, cache=CACHE, sampling=SAMPLING)

    first = register(adapter, base, _metrics(0.5), **kw)
    assert first["alias"] == CHAMPION and first["previous_champion"] is None and first["budget"] == "64"
    second = register(adapter, base, _metrics(0.4), **kw)
    assert second["alias"] == CHALLENGER and second["previous_champion"] == {"version": "1", "metric": 0.5}
    assert _alias_version(tracking, "pte-tiny", CHAMPION) == "1"
    assert _alias_version(tracking, "pte-tiny", CHALLENGER) == "2"
    third = register(adapter, base, _metrics(0.6), **kw)
    assert third["alias"] == CHAMPION and third["previous_champion"] == {"version": "1", "metric": 0.5}
    assert _alias_version(tracking, "pte-tiny", CHAMPION) == "3"

    tags = MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri).get_model_version(
        "pte-tiny", "3").tags
    assert tags["pte.metric"] == "0.6" and tags["pte.metric_name"] == "accuracy" and tags["pte.budget"] == "64"
    assert tags["pte.method"] == "pte" and tags["pte.git_sha"] and tags["pte.base_model"] == "random:llama-tiny"
    assert tags["pte.form"] == third["form"] == "paper"  # the fixture's adapter is the paper's form

    # the champion loads offline from the registry and generates under the registered bounded cache
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/pte-tiny@champion")
    out = model.predict(pd.DataFrame({"prompt": ["2+2="]}))
    assert list(out.columns) == ["text", "num_evictions", "max_cache_tokens", "finished"] and len(out) == 1
    gen = Generator.load(str(base), str(adapter))
    trained = [format_prompt("2+2=", DataConfig())]  # no data section given: the default template, as in training
    prompt_block = encode_prompts(gen.tokenizer, trained)[0].shape[1]
    assert isinstance(out.text[0], str) and out.num_evictions[0] >= 1
    assert out.max_cache_tokens[0] <= prompt_block + CACHE.window
    assert out.text[0] == gen(trained, CACHE, SAMPLING)[0]["text"]  # same policy, prompt, cache and decoding
    # other input forms; the convenience loader
    assert len(model.predict(["a", "bb"])) == 2 and len(model.predict({"prompt": "a"})) == 1
    assert load_champion("pte-tiny", tracking.tracking_uri).predict(["2+2="]).text[0] == out.text[0]


def _artifact_files(tracking: TrackingConfig, model_uri: str, dst: Path) -> dict[str, Path]:
    import mlflow

    from pte.pipeline.registry import _scoped_uri

    with _scoped_uri(tracking.tracking_uri):
        root = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def test_model_from_code_carries_its_training_prompt(policy, tracking, tmp_path):
    """No pickle in the logged model; a bare problem is phrased exactly as the train stage phrases it; raw skips it."""
    import yaml

    from pte.engine.inference import Generator, encode_prompts

    base, adapter = policy
    data = DataConfig(prompt_template="Q: {problem}\nThink, then answer in \\boxed{}.", system_prompt="Be terse.")
    info = register(adapter, base, _metrics(0.5), cfg=RegistryConfig(model_name="pte-prompt"), tracking=tracking,
                    cache=CACHE, sampling=SAMPLING, data=data)

    files = _artifact_files(tracking, info["model_uri"], tmp_path / "model")
    pickled = [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle")) or "pickle" in f]
    assert not pickled, pickled
    mlmodel = yaml.safe_load(files["MLmodel"].read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("registry_model.py")
    assert "registry_model.py" in {Path(f).name for f in files}

    model = load_champion("pte-prompt", tracking.tracking_uri)
    predictor = model.unwrap_python_model()
    assert model.model_config["prompt_template"] == data.template
    assert model.model_config["system_prompt"] == "Be terse."
    problem = "Run the program and give the final value of c.\na=2+3\nb=a-1\nc=b+a"
    # the train stage: format_prompt(row.problem, params.data), chat-templated with system=params.data.system_prompt
    gen = Generator.load(str(base), str(adapter))
    train_ids = encode_prompts(gen.tokenizer, [format_prompt(problem, data)], system=data.system_prompt)[0]
    texts, system = predictor.build_prompts([problem])
    served_ids = encode_prompts(gen.tokenizer, texts, system=system)[0]
    assert served_ids.tolist() == train_ids.tolist()
    decoded = gen.tokenizer.decode(served_ids[0])
    assert "Be terse." in decoded and "Q: Run the program" in decoded and "\\boxed{}" in decoded
    out = model.predict([problem])
    assert out.text[0] == gen([format_prompt(problem, data)], CACHE, SAMPLING, system=data.system_prompt)[0]["text"]
    # raw: the input verbatim (no template, no system message, no chat template)
    assert predictor.build_prompts([problem], raw=True) == ([problem], None)
    raw = model.predict([problem], params={"raw": True})
    assert raw.text[0] == gen([problem], CACHE, SAMPLING, raw=True)[0]["text"]
    assert raw.max_cache_tokens[0] < out.max_cache_tokens[0]  # a shorter prompt block: nothing was added


def test_base_model_by_reference_into_the_training_run(policy, tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pte.pipeline.tracking import make_tracker

    _, adapter = policy
    train = make_tracker(tracking, "train-pte", tmp_path)
    train.close()
    run_id = train.trackers[1].run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")  # the user's setting survives register()
    cfg = RegistryConfig(budget="full", include_base_model=False)  # default name from the adapter's base model
    info = register(adapter, "random:llama-tiny", _metrics(0.5), cfg=cfg, tracking=tracking, cache=CACHE,
                    sampling=SAMPLING, run_id=run_id)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    assert info["name"] == "pte-random-llama-tiny" and info["alias"] == CHAMPION and info["metric"] == 0.9
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(run_id)
    assert info["run_id"] == run_id and run.data.tags["pte.registered_model"] == info["name"]
    assert run.data.metrics["eval/pte/64/accuracy"] == 0.5
    model = load_champion(info["name"], tracking.tracking_uri, model_config={"max_new_tokens": 4})
    assert model.model_config["base_model_ref"] == "random:llama-tiny"
    out = model.predict(["2+2="])
    assert isinstance(out.text[0], str) and len(out.text[0]) <= 4 * 4  # at most 4 byte tokens


def test_unreachable_server_raises_clear_error_fast(policy):
    base, adapter = policy
    dead = TrackingConfig(tracking_uri="http://127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=r"http://127\.0\.0\.1:1.*intact.*dvc repro register"):
        register(adapter, base, _metrics(0.5), tracking=dead, cache=CACHE, sampling=SAMPLING)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1"):
        load_champion("pte-tiny", "http://127.0.0.1:1")
    assert time.monotonic() - t0 < 10


def test_bad_inputs_fail_before_contacting_the_server(policy, tmp_path):
    base, adapter = policy
    dead = TrackingConfig(tracking_uri="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="registry.metric"):
        register(adapter, base, {"pte": {"64": {"f1": 1.0}}}, tracking=dead)
    with pytest.raises(FileNotFoundError, match="pte_adapter.json"):
        register(tmp_path, base, _metrics(0.5), tracking=dead)
