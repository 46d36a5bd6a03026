"""What the pipeline declares to DVC is deterministic and committed; what varies between runs lives in git-ignored
side files (docs/pipeline.md, "What is committed").

Fast checks of dvc.yaml against the ignore rules and the committed dvc.lock, and of the two helpers that keep
declared outputs deterministic (the register stage's candidate, peft's adapter config); slow, that two training
processes with different hash seeds write the same adapter bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pte.engine.adapters import sort_peft_sets
from pte.pipeline.stages import REGISTRATION_RUN_KEYS, registered_candidate

ROOT = Path(__file__).resolve().parents[1]
# Written by every run, never declared: wall times and memory, the registry's answer, the training log, checkpoints.
SIDE_FILES = ["reports/warmstart/resources.json", "reports/evaluate/resources.json",
              "reports/register/registration.json", "models/{m}/metrics.jsonl",
              "models/{m}/checkpoints/step-000002/meta.json", "models/{m}/checkpoints/latest"]
ENVIRONMENT_FILES = ["reports/base_model/environment.json", "reports/warmstart/environment.json",
                     "models/{m}/environment.json", "models/sensitivity/environment.json",
                     "reports/evaluate/environment.json",
                     "reports/register/environment.json"]
"""Each stage's numeric environment (pte.pipeline.numerics.environment): the same bytes on one kind of machine, so
committed beside the metrics, but not declared (another machine's record must not make DVC rerun anything)."""


def declared_outputs(root: Path = ROOT) -> dict[str, bool]:
    """Every output, metric and plot of ``dvc.yaml`` (``foreach`` expanded with ``params.yaml``) -> cached by DVC."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    methods = yaml.safe_load((root / "params.yaml").read_text())["train"]["methods"]
    out: dict[str, bool] = {}
    for stage in stages.values():
        items = methods if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for item in items:
            for kind in ("outs", "metrics", "plots"):
                for entry in body.get(kind, []):
                    path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                    out[path.replace("${item}", str(item))] = (opts or {}).get("cache", True)
    return out


def _ignored(path: str) -> bool:
    """Whether git ignores ``path`` by the repository's rules (the path need not exist)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path], capture_output=True)
    if proc.returncode not in (0, 1):
        pytest.skip(f"git check-ignore failed in {ROOT}: {proc.stderr.decode().strip()}")
    return proc.returncode == 0


def _side_files() -> list[str]:
    methods = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["methods"]
    return sorted({f.format(m=m) for f in SIDE_FILES for m in methods})


def test_side_files_are_git_ignored_and_not_declared():
    declared = declared_outputs()
    for path in _side_files():
        assert _ignored(path), f"{path} differs between runs and must be git-ignored (.gitignore)"
        inside = [d for d in declared if path == d or path.startswith(d.rstrip("/") + "/")]
        assert not inside, f"{path} differs between runs; it must not be (inside) a declared output: {inside}"


def test_environment_records_are_committed_and_not_declared():
    declared = declared_outputs()
    methods = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["methods"]
    for path in sorted({f.format(m=m) for f in ENVIRONMENT_FILES for m in methods}):
        assert not _ignored(path), f"{path} is the committed numeric environment; git must not ignore it"
        assert not [d for d in declared if path == d or path.startswith(d.rstrip("/") + "/")], path
        assert _committed(path) is not None, f"{path} is not committed: commit it with dvc.lock after `make run`"


def test_uncached_outputs_are_committable_and_cached_ones_ignored():
    """``cache: false`` outputs are committed (so not ignored); DVC-cached ones are ignored by DVC's .gitignore files
    (committed too, so that a fresh clone's `dvc repro` writes nothing new)."""
    for path, cached in declared_outputs().items():
        if cached:
            assert _ignored(path), f"{path} is cached by DVC; commit the .gitignore entry that `dvc repro` writes"
        else:
            assert not _ignored(path), f"{path} is a `cache: false` output: it is committed, so git must not ignore it"


def _committed(path: str) -> bytes | None:
    """``path`` as it is in git's index (what a commit holds, whatever a local run left in the working tree)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "show", f":{path}"], capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def test_committed_lock_lists_the_declared_outputs_and_hashes_the_committed_files():
    """dvc.lock is committed with the `cache: false` files it hashes (commit them together after a run of the
    default preset): then `dvc metrics show` works on a fresh clone and its `dvc repro` leaves `git status` clean."""
    lock = _committed("dvc.lock")
    assert lock is not None, "dvc.lock is not committed: run the default preset (`make run`) and commit it"
    stages = yaml.safe_load(lock)["stages"]
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    methods = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["methods"]
    names = {f"{n}@{m}" for n, st in dvc_yaml.items() if "foreach" in st for m in methods}
    names |= {n for n, st in dvc_yaml.items() if "foreach" not in st}
    assert set(stages) == names, "dvc.lock is stale: rerun the default preset and commit dvc.lock"
    locked = {o["path"]: o for st in stages.values() for o in st.get("outs", [])}
    declared = declared_outputs()
    assert set(locked) == set(declared), "dvc.lock is stale: rerun the default preset and commit dvc.lock"
    for path, cached in declared.items():
        if cached:
            continue
        data = _committed(path)
        assert data is not None, f"{path} (`cache: false`) is not committed; commit it with dvc.lock"
        assert hashlib.md5(data).hexdigest() == locked[path]["md5"], f"committed {path} is not the one dvc.lock hashes"


def test_register_declares_a_deterministic_candidate():
    declared = declared_outputs()
    assert declared.get("reports/register/candidate.json") is True  # cached: a fresh clone registers its model again
    answer = {"name": "pte-x", "version": "3", "alias": "challenger", "metric": 0.25, "budget": "140",
              "previous_champion": {"version": "2", "metric": 0.5}, "run_id": "abc", "model_uri": "models:/pte-x/3"}
    candidate = registered_candidate(answer, "accuracy")
    assert candidate == {"name": "pte-x", "metric_name": "accuracy", "metric": 0.25, "budget": "140"}
    assert not set(REGISTRATION_RUN_KEYS) & set(candidate)


def test_sort_peft_sets_orders_the_lists_peft_writes_from_sets(tmp_path):
    cfg = {"target_modules": ["v_proj", "k_proj", "q_proj"], "exclude_modules": None, "modules_to_save": ["b", "a"],
           "r": 4}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sort_peft_sets(tmp_path)
    got = json.loads((tmp_path / "adapter_config.json").read_text())
    assert got == {**cfg, "target_modules": ["k_proj", "q_proj", "v_proj"]}  # lists that are lists keep their order
    sort_peft_sets(tmp_path / "missing")  # a PTE adapter has no adapter_config.json


TRAIN = """
import sys
from pte.config import params_from_dict
from pte.training.train import train
params = params_from_dict({"model": {"source": "random:llama-tiny-wide"}, "cache": {"window": 8},
    "adapter": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {"steps": 1, "prompts_per_step": 2, "micro_batch": 2, "grpo": {"reward": "char_match"},
              "rollout": {"num_generations": 2, "max_completion_length": 8, "batch": 4}}})
train(params, "lora", ["abc", "def"], ["abc", "def"], sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_lora_adapter_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """peft writes ``target_modules`` from a set; two processes with other hash seeds must write the same files."""
    dirs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / seed)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs.append(tmp_path / seed / "adapter")
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == sorted(p.name for p in dirs[1].iterdir()) and "adapter_config.json" in names
    assert [(dirs[0] / n).read_bytes() for n in names] == [(dirs[1] / n).read_bytes() for n in names]


DVC_DROPPED_PARAMS = {"size", "nfiles"}
"""Params keys DVC's run-cache key leaves out (treeverse/dvc#10296): a change to one restores the earlier output."""


@pytest.mark.parametrize("key, reruns", [("count", True), ("size", False)])
def test_run_cache_sees_the_data_sources_count_but_not_a_size(tmp_path, key, reruns):
    """The data sources' row count is ``count``: ``make run``'s ``dvc repro`` (flags read from the Makefile) reruns a
    stage whose ``count`` changed. The same stage keyed ``size`` reproduces the DVC bug that motivated the name: the
    run cache restores the earlier output (docs/pipeline.md). If the ``size`` case fails, DVC has fixed the bug."""
    recipe = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                  if line.startswith("\t") and "/dvc repro" in line)
    flags = recipe.split("/dvc repro", 1)[1].split()
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

    (tmp_path / "gen.py").write_text(f"import yaml\nn = yaml.safe_load(open('params.yaml'))['data'][0]['{key}']\n"
                                     "open('out.txt', 'w').write('x' * n)\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gen": {
        "cmd": f"{sys.executable} gen.py", "deps": ["gen.py"], "params": ["data"], "outs": ["out.txt"]}}}))
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    lengths = []
    for n in (2, 5, 2):  # the third run has a run-cache entry of its own params (n = 2) and one of n = 5's
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": [{"name": "a", key: n}]}))
        run(dvc, "repro", *flags)
        lengths.append(len((tmp_path / "out.txt").read_text()))
    assert (lengths == [2, 5, 2]) is reruns, lengths


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*map(_keys, obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*map(_keys, obj))
    return set()


def test_no_params_key_is_one_the_run_cache_drops():
    """No preset, ``params.yaml`` or config field (the full resolved params, defaults included) has a key DVC's run
    cache ignores (``DVC_DROPPED_PARAMS``)."""
    import dataclasses

    from pte.config import load_params

    for path in [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]:
        assert not _keys(yaml.safe_load(path.read_text())) & DVC_DROPPED_PARAMS, path.name
        assert not _keys(dataclasses.asdict(load_params(path))) & DVC_DROPPED_PARAMS, path.name
