"""params.yaml <-> dataclasses: defaults load, and bad keys/values name the key, the value and a fix."""

from __future__ import annotations

import dataclasses

import pytest

from pte.config import CacheConfig, PTEConfig, PTEExtensions, load_params, params_from_dict


def test_defaults_and_roundtrip(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("cache:\n  window: 64\n  evict_ratio: 0.5\nadapter:\n  target_modules: [q_proj, v_proj]\n")
    params = load_params(p)
    assert params.cache.window == 64 and params.cache.evict_ratio == 0.5
    assert params.adapter.target_modules == ("q_proj", "v_proj")
    assert params.to_dict()["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert params_from_dict(params.to_dict()) == params


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"cache": {"window": 0}}, "`cache.window` = 0"),
        ({"cache": {"evict_ratio": 1.5}}, "`cache.evict_ratio` = 1.5"),
        ({"cache": {"evict_ratio": 0.0}}, "(0, 1]"),
        ({"cache": {"window": "big"}}, "`cache.window` = 'big'"),
        ({"cache": {"window": True}}, "`cache.window` = True"),
        ({"adapter": {"rank": "8"}}, "`adapter.rank` = '8' is invalid; allowed: an integer"),
        ({"cache": {"windw": 3}}, "unknown key `cache.windw`"),
        ({"caches": {}}, "unknown section `caches`"),
        ({"cache": {"window": 8, "budget": 64}}, "set one of them"),
        ({"evaluate": {"top_p": 0}}, "`evaluate.top_p` = 0"),
        ({"sampling": {"top_p": 0.9}}, "unknown section `sampling`"),  # removed: nothing read it
        ({"train": {"methods": ["lora", "base"]}}, "`train.methods` = ['lora', 'base']"),
        ({"evaluate": {"methods": ["pte", "qlora"]}}, "`evaluate.methods` = ['pte', 'qlora']"),
    ],
)
def test_invalid_values_raise_with_key_and_value(data, needle):
    with pytest.raises(ValueError) as err:
        params_from_dict(data)
    assert needle in str(err.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file"):
        load_params(tmp_path / "nope.yaml")


def test_window_semantics():
    assert CacheConfig(window=None).is_full
    assert CacheConfig(window="auto").thinking_window(37) == 37
    assert CacheConfig(window=None, budget=100).thinking_window(30) == 70
    with pytest.raises(ValueError, match="leaves no room"):
        CacheConfig(window=None, budget=30).thinking_window(30)
    assert CacheConfig(window=16, evict_ratio=0.25).evict_count(16) == 4
    assert CacheConfig(window=10, evict_ratio=0.25).evict_count(10) == 3  # ceil(2.5)
    assert CacheConfig(window=10, evict_ratio=1.0).evict_count(10) == 10
    assert CacheConfig(window=3, evict_ratio=0.01).evict_count(3) == 1


def test_budget_alone_needs_no_window_null():
    assert CacheConfig(budget=140) == CacheConfig(window=None, budget=140)
    assert CacheConfig().window == "auto" and type(CacheConfig().window) is str
    assert params_from_dict({"cache": {"budget": 140}}).cache == CacheConfig(window=None, budget=140)
    assert params_from_dict({"cache": {"window": None, "budget": 140}}).cache.window is None
    for explicit in ("auto", 32):  # given together with a budget, a window is a conflict
        with pytest.raises(ValueError, match="set one of them"):
            CacheConfig(window=explicit, budget=140)
        with pytest.raises(ValueError, match="set one of them"):
            params_from_dict({"cache": {"window": explicit, "budget": 140}})
    params = params_from_dict({"cache": {"budget": 140}})
    assert params_from_dict(params.to_dict()) == params  # the resolved window (null) round-trips


def test_a_contradictory_ablation_fails_in_one_line():
    """Ablations are method names; a YAML switch that would make one of them inert fails before anything runs."""
    with pytest.raises(ValueError, match=r"^method 'pte_global_only' with pte.use_global_state: false is") as e:
        params_from_dict({"pte": {"use_global_state": False}, "evaluate": {"methods": ["base", "pte_global_only"]}})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="S = Normalize\\(0\\) = 0"):
        params_from_dict({"pte": {"use_global_state": False, "event_updates": False}})
    from pte.engine.adapters import method_pte_config

    cfg = PTEConfig()
    assert not method_pte_config("pte_global_only", cfg).event_updates
    assert not method_pte_config("pte_no_global", cfg).use_global_state and method_pte_config("pte", cfg) == cfg


def test_the_paper_preset_writes_out_the_papers_form():
    """presets/paper.yaml spells out every ``pte:`` key, and they are the paper's form (Eqs. 4-6): accumulated
    normalisation, global state and event updates on, and an empty ``extensions`` section, which is the paper's
    linear write of each token alone."""
    import yaml

    written = yaml.safe_load(open("presets/paper.yaml"))["pte"]
    assert set(written) == {f.name for f in dataclasses.fields(PTEConfig)} and written["extensions"] == {}
    pte = load_params("presets/paper.yaml").pte
    assert pte.extensions == PTEExtensions() and pte.form() == "paper"
    assert (pte.extensions.write, pte.extensions.write_context, pte.normalize) == ("linear", 1, "accumulate")
    assert pte.event_updates and pte.use_global_state and not pte.per_layer_globals and pte.global_tokens == 32


def test_extensions_are_apart_and_named_and_removed_settings_fail_naming_the_commit():
    from pte.config.schema import LAST_COMMIT_WITH_REMOVED

    demo = load_params("presets/cpu-demo.yaml").pte
    assert demo.form() == "paper+write=softmax,write_context=2,grad_horizon=16"
    assert PTEConfig(extensions=PTEExtensions(write_context=3)).form() == "paper+write_context=3,grad_horizon=16"
    for key, value in (("write_gate", True), ("read", "gated")):
        with pytest.raises(ValueError, match=f"`pte.{key}`.*removed.*{LAST_COMMIT_WITH_REMOVED}"):
            params_from_dict({"pte": {key: value}})
    for old, new in (("write", "pte.extensions.write"), ("write_context", "pte.extensions.write_context"),
                     ("gate_horizon", "pte.extensions.grad_horizon")):
        with pytest.raises(ValueError, match=f"`pte.{old}` moved to `{new}`"):
            params_from_dict({"pte": {old: 1}})
    with pytest.raises(ValueError, match=r"extensions \['write=softmax', 'grad_horizon=16'\] need pte.normalize"):
        params_from_dict({"pte": {"normalize": "recursive", "extensions": {"write": "softmax"}}})
    with pytest.raises(ValueError, match="unknown key `pte.extensions.gate`"):
        params_from_dict({"pte": {"extensions": {"gate": True}}})


@pytest.mark.parametrize("preset", ["cpu-demo", "smoke", "paper"])
def test_no_preset_weighs_task_labels(preset):
    """A user's data has no recall label: no preset's loss weighs one (``train.sft.recall_weight`` stays 1, the oracle
    is a research setting), and the default preset's ``pte`` trains on a signal every task has (docs/method.md)."""
    train = load_params(f"presets/{preset}.yaml").train
    assert train.sft.recall_weight == 1.0 and train.sft.recall_weight_after == 1.0
    if preset == "cpu-demo":
        assert train.objective == "sft" and train.sft.eviction_weight > 0 and "pte" in train.methods
