"""Data sources, disjoint splits, JSONL validation and prompts (offline, seeded, a few seconds)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pte.data.rows import (
    HUB_SOURCES,
    DataConfig,
    Row,
    SourceSpec,
    build_splits,
    chat_messages,
    data_config_from_dict,
    format_prompt,
    normalize_problem,
    prepare_data,
    read_jsonl,
    write_jsonl,
)
from pte.data.sources import SourceUnavailableError, load_source

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}

PARAMS_SNIPPET = """
data:
  train:
    - {name: "reasoning_gym:chain_sum", count: 64, seed: 0,
       kwargs: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}}
    - {name: "reasoning_gym:basic_arithmetic", count: 16, seed: 0,
       kwargs: {min_terms: 2, max_terms: 2, max_digits: 2, operators: ["+", "-"],
                allow_parentheses: false, allow_negation: false}}
    - {name: "reasoning_gym:simple_equations", count: 8, seed: 0}
    - {name: "reasoning_gym:gsm_symbolic", count: 8, seed: 0}
  eval:
    - {name: "reasoning_gym:chain_sum", count: 16, seed: 1000003,
       kwargs: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}}
    - {name: champ, count: 8, seed: 0, kwargs: {numeric_only: true}}
  prompt_template: boxed
  system_prompt: null
  dedupe: true
"""


def small_cfg(**over) -> DataConfig:
    return data_config_from_dict({**yaml.safe_load(PARAMS_SNIPPET)["data"], **over})


# ----------------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("name", ["gsm_symbolic", "basic_arithmetic", "chain_sum", "simple_equations"])
def test_reasoning_gym_deterministic(name):
    spec = SourceSpec(f"reasoning_gym:{name}", count=12, seed=5)
    a, b = load_source(spec), load_source(spec)
    assert a == b and len(a) == 12
    assert len({r.id for r in a}) == 12
    assert a[3].id == f"reasoning_gym:{name}:5:3" and a[3].source == f"reasoning_gym:{name}"
    assert all(isinstance(r.answer, str) and r.answer.strip() and r.problem.strip() for r in a)
    assert load_source(SourceSpec(spec.name, count=12, seed=6)) != a


def test_reasoning_gym_kwargs_pass_through_and_errors():
    rows = load_source(SourceSpec("reasoning_gym:chain_sum", count=50, seed=0, kwargs=EASY))
    assert all(r.problem.count("+") + r.problem.count("-") == 1 for r in rows)
    assert all(abs(int(r.answer)) <= 198 for r in rows)
    with pytest.raises(ValueError, match=r"data\.train\[0\]\.kwargs.*allowed keys: .*min_terms"):
        load_source(SourceSpec("reasoning_gym:chain_sum", count=5, kwargs={"bogus": 1}), "data.train[0]")
    with pytest.raises(ValueError, match="reasoning-gym has no dataset 'nope'.*chain_sum"):
        load_source(SourceSpec("reasoning_gym:nope", count=5))
    with pytest.raises(ValueError, match=r"`data\.train\[0\]\.count` is null"):
        DataConfig(train=(SourceSpec("reasoning_gym:chain_sum"),))


def test_champ_270_rows():
    rows = load_source(SourceSpec("champ"))
    assert len(rows) == 270 and len({r.id for r in rows}) == 270
    assert all(r.id.startswith("champ:P_") and r.source == "champ" for r in rows)
    assert all(r.answer.strip() and r.problem.strip() for r in rows)
    numeric = load_source(SourceSpec("champ", kwargs={"numeric_only": True}))
    assert 0 < len(numeric) < 270 and {r.answer for r in numeric} >= {"239", "1/18", "-5"}
    sub = load_source(SourceSpec("champ", count=10, seed=1))
    assert sub == load_source(SourceSpec("champ", count=10, seed=1)) != load_source(SourceSpec("champ", count=10))
    assert [r.id for r in sub] == [r.id for r in rows if r.id in {s.id for s in sub}]  # dataset order kept
    with pytest.raises(ValueError, match=r"`data\.eval\[0\]\.count` = 300 but champ has only 270"):
        load_source(SourceSpec("champ", count=300), "data.eval[0]")


# ----------------------------------------------------------------------------------------------------------------------
# Hub sources through local files (one example row per registered dataset, in its own column layout)

DAPO = HUB_SOURCES["dapo_math_17k"]
HUB_EXAMPLES = {
    "dapo_math_17k": ({"prompt": DAPO.strip_prefix + "Compute $1+1$." + DAPO.strip_suffix, "solution": "2",
                       "data_source": "math_dapo", "extra_info": {"index": "a1b2"}}, "dapo_math_17k:a1b2",
                      "Compute $1+1$.", "2"),
    "math500": ({"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "answer": "1", "solution": "...",
                 "unique_id": "test/algebra/1.json", "level": 1}, "math500:test/algebra/1.json",
                "What is $\\frac{1}{2}+\\frac{1}{2}$?", "1"),
    "olympiadbench": ({"id": 1606, "question": "Find $x$.", "final_answer": ["$\\frac{1}{2}$"],
                       "context": "Let $x = 1/2$."}, "olympiadbench:1606", "Let $x = 1/2$.\n\nFind $x$.",
                      "\\frac{1}{2}"),
    "minerva_math": ({"question": "Find the mass in kg.", "answer": "3.5"}, "minerva_math:0",
                     "Find the mass in kg.", "3.5"),
    "amc23": ({"id": 7, "question": "How many?", "answer": 27.0, "url": "https://x"}, "amc23:7", "How many?", "27"),
    "aime24": ({"id": 60, "problem": "Find $n$.", "answer": "204", "solution": "...", "url": "u", "year": "2024"},
               "aime24:60", "Find $n$.", "204"),
    "aime25": ({"problem": "Find $m$.", "answer": "70", "id": "0"}, "aime25:0", "Find $m$.", "70"),
}


def _write_local(path: Path, records: list[dict]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_every_hub_source_has_an_example():
    assert set(HUB_EXAMPLES) == set(HUB_SOURCES)


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("name", sorted(HUB_EXAMPLES))
def test_hub_source_from_local_file(tmp_path, name, ext):
    record, want_id, want_problem, want_answer = HUB_EXAMPLES[name]
    other = json.loads(json.dumps(record))  # a second, different row in the same layout
    for k in ("id", "unique_id"):
        if k in other:
            other[k] = other[k] + 1 if isinstance(other[k], int) else other[k] + "-b"
    if "extra_info" in other:
        other["extra_info"]["index"] = "c3d4"
    path = tmp_path / f"{name}.{ext}"
    _write_local(path, [record, other])
    rows = load_source(SourceSpec(name, local_path=str(path)))
    assert len(rows) == 2 and rows[0] == Row(want_id, name, want_problem, want_answer)
    assert rows[1].id != rows[0].id
    assert load_source(SourceSpec(name, count=1, seed=0, local_path=str(path)))[0] in rows


def test_answer_normalization():
    from pte.data.sources import _answer_text

    cases = {27.0: "27", 2.5: "2.5", 3: "3", " $x^2$ ": "x^2", "$$\\pi$$": "\\pi", "$x$ and $y$": "$x$ and $y$",
             ("$1$", "$2$"): "1, 2", None: "", "$": "$"}
    for value, want in cases.items():
        assert _answer_text(list(value) if isinstance(value, tuple) else value) == want, value


def test_hub_local_file_bad_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl row 0 .*answer is missing or empty"):
        load_source(SourceSpec("math500", local_path=str(path)))
    path.write_text('{"problem": "p", "answer": "1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl line 2: not valid JSON"):
        load_source(SourceSpec("math500", local_path=str(path)))
    with pytest.raises(FileNotFoundError, match="fix local_path"):
        load_source(SourceSpec("math500", local_path=str(tmp_path / "missing.parquet")))


@pytest.mark.timeout(60)
def test_hub_offline_without_local_path_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an id that no HF cache can hold, so the outcome does not depend on the machine
    spec = SourceSpec("math500", kwargs={"path": "pte-tests/no-such-dataset"})
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError) as info:
        load_source(spec, "data.eval[2]")
    assert time.monotonic() - start < 15
    msg = str(info.value)
    for part in ("'math500'", "data.eval[2]", "offline", "local_path", "champ", "reasoning_gym:"):
        assert part in msg, (part, msg)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_source_lists_known_names():
    with pytest.raises(ValueError) as info:
        data_config_from_dict({"eval": [{"name": "gsm8k"}]})
    msg = str(info.value)
    assert "data.eval[0].name" in msg and "'gsm8k'" in msg
    for known in ("champ", "reasoning_gym:<dataset>", *HUB_SOURCES):
        assert known in msg


# ----------------------------------------------------------------------------------------------------------------------
# Config


def test_config_parsing_and_errors():
    cfg = small_cfg()
    assert cfg.train[0] == SourceSpec("reasoning_gym:chain_sum", 64, 0, kwargs=EASY)
    assert cfg.train[1].kwargs["operators"] == ["+", "-"]
    assert data_config_from_dict({"eval": ["champ"]}).eval == (SourceSpec("champ"),)
    assert data_config_from_dict(None) == DataConfig() == DataConfig.from_dict({})
    plain = json.loads(json.dumps(dataclasses.asdict(cfg)))  # what Params.to_dict() logs
    assert data_config_from_dict(plain) == cfg
    cases = [
        ({"train": [{"name": "champ", "count": "ten"}]}, r"`data\.train\[0\]\.count` = 'ten' is invalid"),
        ({"eval": ["champ", {"name": "champ", "sise": 3}]}, r"unknown key `data\.eval\[1\]\.sise`"),
        ({"eval": [{"name": "champ", "count": 0}]}, r"`data\.eval\[0\]\.count` = 0 is invalid"),
        ({"eval": [{"name": "champ", "size": 5}]},  # the old name, which DVC's run cache ignores
         r"`data\.eval\[0\]\.size` was renamed `data\.eval\[0\]\.count`.*write count: 5"),
        ({"eval": [{"name": "champ", "revision": "v1"}]}, r"`data\.eval\[0\]\.revision` is set but champ"),
        ({"eval": [{"name": "champ", "kwargs": {"numeric": True}}]}, r"unknown key\(s\) \['numeric'\]"),
        ({"eval": [{"name": "math500", "kwargs": {"path": 3}}]}, r"`data\.eval\[0\]\.kwargs\.path` = 3"),
        ({"eval": []}, r"`data\.eval` is empty"),
        ({"train": "champ"}, r"`data\.train` = 'champ' is invalid; allowed: a list"),
        ({"prompt_template": "no placeholder"}, r"`data\.prompt_template`"),
        ({"shuffle": True}, r"unknown key `data\.shuffle`"),
    ]
    for mapping, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            data_config_from_dict(mapping)


def test_prompts():
    cfg = DataConfig()
    text = format_prompt("What is 2+3?", cfg)
    assert text.startswith("What is 2+3?") and "\\boxed{}" in text
    assert chat_messages("x", cfg) == [{"role": "user", "content": format_prompt("x", cfg)}]
    dapo = DataConfig(prompt_template="dapo", system_prompt="You are a careful mathematician.")
    msgs = chat_messages("Find {x}.", dapo)
    assert msgs[0] == {"role": "system", "content": "You are a careful mathematician."}
    assert "\n\nFind {x}.\n\n" in msgs[1]["content"] and 'after "Answer:"' in msgs[1]["content"]
    custom = DataConfig(prompt_template="Q: {problem}\nA: let's think, then write \\boxed{answer}.")
    assert format_prompt("1+1?", custom) == "Q: 1+1?\nA: let's think, then write \\boxed{answer}."


# ----------------------------------------------------------------------------------------------------------------------
# Splits


def test_train_and_eval_never_overlap():
    same = {"name": "reasoning_gym:chain_sum", "seed": 0, "kwargs": EASY}
    cfg = data_config_from_dict({"train": [{**same, "count": 100}, {"name": "champ", "count": 40, "seed": 3}],
                                 "eval": [{**same, "count": 20}, {"name": "champ", "count": 40, "seed": 4}]})
    splits = build_splits(cfg)
    train, ev = splits["train"], splits["eval"]
    eval_keys = {normalize_problem(r.problem) for r in ev}
    assert eval_keys and not any(normalize_problem(r.problem) in eval_keys for r in train)
    ids = [r.id for r in train + ev]
    assert len(ids) == len(set(ids))
    assert any(r.source == "champ" for r in train)
    assert sum(r.source == "champ" for r in train) < 40  # the champ problems sampled for both splits left train


def test_overlap_is_reported_and_dedupe(tmp_path):
    same = {"name": "reasoning_gym:chain_sum", "seed": 0, "kwargs": EASY}
    cfg = data_config_from_dict({"train": [{**same, "count": 100}], "eval": [{**same, "count": 20}]})
    stats = prepare_data(cfg, tmp_path)
    train, ev = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "eval.jsonl")
    d = stats["dropped"]
    assert d["train_overlapping_eval"] >= 20 - d["eval_duplicates"]  # every eval problem was also a train problem
    assert stats["generated"] == {"train": 100, "eval": 20, "warmstart": 0}
    assert stats["train"]["rows"] == len(train) == 100 - d["train_overlapping_eval"] - d["train_duplicates"]
    assert stats["eval"]["per_source"] == {"reasoning_gym:chain_sum": len(ev)}
    assert not {normalize_problem(r.problem) for r in train} & {normalize_problem(r.problem) for r in ev}
    kept = build_splits(data_config_from_dict({"train": [{**same, "count": 100}], "eval": ["champ"], "dedupe": False}))
    assert len(kept["train"]) == 100


def test_warmstart_split_never_holds_eval_or_train_problems(tmp_path):
    # the warm-start sources deliberately repeat the eval and train seeds: those problems must be dropped
    chain = {"name": "var_chain", "kwargs": {"steps": 7}}
    cfg = data_config_from_dict({"train": [{**chain, "seed": 0, "count": 30}],
                                 "eval": [{**chain, "seed": 1, "count": 20}],
                                 "warmstart": [{**chain, "seed": 1, "count": 10}, {**chain, "seed": 0, "count": 10},
                                               {**chain, "seed": 2, "count": 25},
                                               {"name": "reasoning_gym:chain_sum", "seed": 5, "count": 10,
                                                "kwargs": EASY}]})
    stats = prepare_data(cfg, tmp_path)
    splits = {n: read_jsonl(tmp_path / f"{n}.jsonl") for n in ("train", "eval", "warmstart")}
    keys = {n: {normalize_problem(r.problem) for r in rows} for n, rows in splits.items()}
    assert not keys["warmstart"] & keys["eval"] and not keys["warmstart"] & keys["train"]
    assert stats["dropped"]["warmstart_overlapping_train_or_eval"] == 20
    assert stats["generated"]["warmstart"] == 55
    assert stats["warmstart"]["per_source"]["var_chain"] == 25


def test_cpu_demo_eval_problems_never_reach_warmstart_or_training():
    """Held-out problems of the default preset appear in neither the warm-start nor the GRPO data."""
    from pte.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "presets" / "cpu-demo.yaml")
    assert params.warmstart.enabled and params.data.warmstart
    splits = build_splits(params.data)
    keys = {n: {normalize_problem(r.problem) for r in rows} for n, rows in splits.items()}
    assert keys["eval"] and keys["warmstart"] and keys["train"]
    assert not keys["eval"] & keys["warmstart"] and not keys["eval"] & keys["train"]
    assert not keys["warmstart"] & keys["train"]


def test_colliding_ids_are_reported():
    a = {"name": "reasoning_gym:chain_sum", "seed": 0, "count": 5}
    cfg = data_config_from_dict({"train": [{**a, "kwargs": EASY}, {**a, "kwargs": {"min_digits": 3}}],
                                 "eval": [{"name": "champ", "count": 2}]})
    with pytest.raises(ValueError, match=r"'reasoning_gym:chain_sum:0:0' at train\[0\], train\[5\].*different seeds"):
        build_splits(cfg)


def test_prepare_data_byte_identical(tmp_path):
    cfg = small_cfg()
    stats = prepare_data(cfg, tmp_path / "a")
    first = {n: (tmp_path / "a" / n).read_bytes() for n in ("train.jsonl", "eval.jsonl")}
    assert prepare_data(cfg, tmp_path / "a") == stats
    assert prepare_data(cfg, tmp_path / "b") == stats
    for n, data in first.items():
        assert (tmp_path / "a" / n).read_bytes() == data == (tmp_path / "b" / n).read_bytes()
        assert data.endswith(b"\n") and not data.endswith(b"\n\n")
    assert read_jsonl(tmp_path / "a" / "eval.jsonl") == build_splits(cfg)["eval"]
    assert set(stats["eval"]["per_source"]) == {"champ", "reasoning_gym:chain_sum"}
    # no temp files left; warmstart.jsonl is written (empty) even without warm-start sources
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["eval.jsonl", "train.jsonl", "warmstart.jsonl"]
    assert (tmp_path / "a" / "warmstart.jsonl").read_bytes() == b""
    # a fresh interpreter with another hash seed writes the same bytes (no set/dict-order leaks)
    code = ("import sys, yaml; from pte.data.rows import data_config_from_dict, prepare_data; "
            "prepare_data(data_config_from_dict(yaml.safe_load(sys.stdin.read())['data']), sys.argv[1])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], input=PARAMS_SNIPPET, text=True, env=env,
                   check=True, timeout=120)
    for n, data in first.items():
        assert (tmp_path / "c" / n).read_bytes() == data


# ----------------------------------------------------------------------------------------------------------------------
# JSONL validation

GOOD = {"id": "a", "source": "s", "problem": "p", "answer": "1"}


def test_jsonl_roundtrip_unicode(tmp_path):
    rows = [Row("x:1", "s", "Найдите $\\sqrt{2}$ ≥ 1\u2028line", "√2"), Row("x:2", "s", "p", "1")]
    write_jsonl(rows, tmp_path / "r.jsonl")
    raw = (tmp_path / "r.jsonl").read_bytes()
    assert "Найдите".encode() in raw and raw.count(b"\n") == 2
    assert raw.splitlines()[0].startswith(b'{"answer": ')
    assert read_jsonl(tmp_path / "r.jsonl") == rows


@pytest.mark.parametrize("lines, pattern", [
    ([GOOD, "{not json"], r"line 2: not valid JSON"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "answer"} | {"id": "b"}], r"line 2: field 'answer' is missing"),
    ([{**GOOD, "answer": 42}], r"line 1: field 'answer' is int \(42\), not a string"),
    ([GOOD, {**GOOD, "id": "b", "answer": "  "}],
     r"line 2: field 'answer' is empty; every row needs a non-empty final answer"),
    ([{**GOOD, "extra": 1}], r"line 1: unknown field\(s\) \['extra'\]"),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    ([GOOD, {**GOOD, "id": "b"}, GOOD, {**GOOD, "id": "b"}, GOOD],
     r"2 duplicate id\(s\): 'a' \(lines 1, 3, 5\); 'b' \(lines 2, 4\)"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, pattern):
    path = tmp_path / "train.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    with pytest.raises(ValueError, match=pattern) as info:
        read_jsonl(path)
    assert str(info.value).startswith(str(path))


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the `data` stage"):
        read_jsonl(tmp_path / "nope.jsonl")
