"""The warm-start stage: SFT examples, a deterministic fine-tune that learns, the disabled path, base resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pte.config import WarmstartConfig, params_from_dict
from pte.data.rows import DataConfig, Row, chat_messages, data_config_from_dict
from pte.data.sources import SourceSpec, load_source
from pte.training.warmstart import DISABLED_MARKER, resolve_base, sft_examples, warmstart, write_disabled

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DataConfig()
ROWS = load_source(SourceSpec("var_chain", count=4, seed=7, kwargs={"steps": 7}))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_sft_examples_use_the_pipeline_prompt_and_a_boxed_solution():
    examples = sft_examples(ROWS, DATA)
    for row, ex in zip(ROWS, examples, strict=True):
        assert ex["prompt"] == chat_messages(row.problem, DATA)
        [msg] = ex["completion"]
        assert msg["role"] == "assistant" and msg["content"].endswith(f"\\boxed{{{row.answer}}}")
    with_system = data_config_from_dict({"system_prompt": "Be brief."})
    assert sft_examples(ROWS[:1], with_system)[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError, match="no worked solution for row 'champ:1'.*var_chain"):
        sft_examples([Row("champ:1", "champ", "What is 1+1?", "2")], DATA)


def test_warmstart_learns_and_is_deterministic(tmp_path):
    from pte.engine.models import load_model

    cfg = WarmstartConfig(enabled=True, epochs=6, lr=1e-2, batch_size=4, warmup=0.0, max_length=256)
    result = warmstart("random:llama-tiny", ROWS, cfg, DATA, tmp_path / "a", seed=0, progress=False)
    assert result["examples"] == 4 and result["steps"] == 6 and len(result["history"]) == 6
    assert result["loss_last"] < 0.7 * result["loss_first"]  # it fits the worked solutions
    again = warmstart("random:llama-tiny", ROWS, cfg, DATA, tmp_path / "b", seed=0, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # bit-identical model directory
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    tuned, tok = load_model(str(tmp_path / "a"))
    base, _ = load_model("random:llama-tiny")
    assert tuned.config.use_cache and tok.chat_template == load_model("random:llama-tiny")[1].chat_template
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed  # full fine-tuning


def test_warmstart_refuses_empty_data(tmp_path):
    with pytest.raises(ValueError, match="no problems to fine-tune on.*warmstart.enabled: false"):
        warmstart("random:llama-tiny", [], WarmstartConfig(enabled=True), DATA, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_resolve_base_and_the_disabled_marker(tmp_path):
    warm = tmp_path / "warm"
    write_disabled(warm)
    assert json.loads((warm / DISABLED_MARKER).read_text()) == {"enabled": False}
    assert resolve_base("models/base", warm) == "models/base"
    assert resolve_base("models/base", None) == "models/base"
    (warm / "config.json").write_text("{}")
    assert resolve_base("models/base", warm) == str(warm)
    with pytest.raises(FileNotFoundError, match="holds neither a model nor warmstart.json.*dvc repro warmstart"):
        resolve_base("models/base", tmp_path / "missing")


def test_warmstart_params_are_validated():
    with pytest.raises(ValueError, match="`warmstart.enabled` is true but `data.warmstart` lists no source"):
        params_from_dict({"warmstart": {"enabled": True}})
    for key, value in (("epochs", 0), ("lr", -1.0), ("batch_size", 0), ("warmup", 1.0)):
        with pytest.raises(ValueError, match=f"warmstart.{key}"):
            params_from_dict({"warmstart": {key: value}})
