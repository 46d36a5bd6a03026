"""Prefect wiring: flows/pipeline.py and prefect.yaml.

Fast checks of the wiring helpers and of prefect.yaml; the flow end to end on the smoke preset in a clone of
this repository (ephemeral Prefect server, MLflow in the clone; marked slow); and, against a real local
``prefect server``, ``prefect deploy --all`` of prefect.yaml run by a process worker, and a served deployment whose
*scheduled* run completes. Every Prefect process gets its own PREFECT_HOME under tmp_path; process groups are
stopped serve before server (otherwise the serve process hangs on shutdown) and checked for leftovers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
STAGES = ["base_model", "data", "warmstart", "train@lora", "train@lora_c", "train@pte", "evaluate", "register"]


def _load_flows():
    spec = importlib.util.spec_from_file_location("pte_flows_pipeline", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flows():
    return _load_flows()


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def _env(home: Path, cwd: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Isolated Prefect (own PREFECT_HOME; ephemeral server unless api_url), offline, MLflow in the working dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PWD=str(cwd), PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""), **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _clone(dst: Path) -> Path:
    """A clone of this checkout's HEAD, with the files under test (flows/, prefect.yaml) as they are here."""
    top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: {top.stderr.strip()}")
    subprocess.run(["git", "clone", "-q", top.stdout.strip(), str(dst)], check=True, timeout=120)
    # identical in a clean CI clone; during development the working tree's versions are the ones tested
    shutil.copytree(ROOT / "flows", dst / "flows", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", dst / "prefect.yaml")
    return dst


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


# --- wiring helpers and prefect.yaml (fast) ---------------------------------------------------------------------


def test_prefect_yaml_deployments_point_at_the_flow():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"nightly", "cluster-paper"}
    for dep in deps.values():
        path, func = dep["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert isinstance(flow, Flow) and flow.name == "pte-pipeline"
        assert set(dep["parameters"]) <= set(flow.parameters.properties), dep["parameters"]
        assert (ROOT / "presets" / f"{dep['parameters']['preset']}.yaml").is_file()
    nightly, paper = deps["nightly"], deps["cluster-paper"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert nightly["work_pool"]["name"] == "pte-process" and nightly["parameters"] == {"preset": "cpu-demo"}
    assert paper["parameters"] == {"preset": "paper"} and not paper["schedules"]
    # the k8s worker overlay creates and serves the pool the deployment names, with the template we fill in
    worker = (ROOT / "k8s/overlays/prefect-worker/deployment.yaml").read_text()
    assert f"work-pool create {paper['work_pool']['name']} --type kubernetes" in worker
    assert f"worker start --pool {paper['work_pool']['name']}" in worker
    template = json.loads((ROOT / "k8s/overlays/prefect-worker/base-job-template.json").read_text())
    assert set(paper["work_pool"]["job_variables"]) <= set(template["variables"]["properties"])
    assert paper["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
        template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["workingDir"]


def test_select_targets_keeps_pipeline_order(flows):
    assert flows.select_targets(STAGES, None) == STAGES
    assert flows.select_targets(STAGES, ["register", "train"]) == ["train@lora", "train@lora_c", "train@pte",
                                                                   "register"]
    assert flows.select_targets(STAGES, ["train@pte", "data"]) == ["data", "train@pte"]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\].*'evaluate'"):
        flows.select_targets(STAGES, ["trian"])


def test_use_preset_switches_params_only_when_needed(flows, tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("a: 1\n")
    (tmp_path / "presets" / "b.yaml").write_text("b: 2\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    assert flows.use_preset.fn(str(tmp_path), "a") is False
    assert flows.use_preset.fn(str(tmp_path), "b") is True
    assert (tmp_path / "params.yaml").read_text() == "b: 2\n"
    assert flows.use_preset.fn(str(tmp_path), None) is False
    for bad in ("nope", "../presets/a"):
        with pytest.raises(ValueError, match=r"unknown preset .*\['a', 'b'\]"):
            flows.use_preset.fn(str(tmp_path), bad)


def test_registration_markdown_links_to_the_run(flows):
    reg = {"name": "pte-x", "version": "3", "alias": "champion", "run_id": "abc", "model_uri": "models:/pte-x/3",
           "metric": 0.5, "budget": "176", "previous_champion": "2"}
    md, url = flows._registration_markdown(reg, "http://mlflow:5000/")
    assert url == "http://mlflow:5000/#/runs/abc" and f"[abc]({url})" in md
    assert "http://mlflow:5000/#/models/pte-x/versions/3" in md and "`champion`" in md
    md, url = flows._registration_markdown(reg, "sqlite:////repo/mlflow.db")
    assert url is None and "mlflow ui --backend-store-uri sqlite:////repo/mlflow.db" in md and "#/runs/abc" in md


def test_run_logs_output_and_raises_with_its_tail(flows, tmp_path, caplog):
    script = "import sys; print('one'); sys.stdout.write('bar 1\\rbar 2\\rbar done\\n'); print('last'); sys.exit(3)"
    with caplog.at_level(logging.INFO, logger="flows.pipeline"), \
            pytest.raises(RuntimeError, match=r"(?s)exit code 3 .*bar done\nlast$"):
        flows._run([PY, "-c", script], tmp_path, flows._logger())
    logged = [r.getMessage() for r in caplog.records]
    # the first progress redraw and the final state are logged, the redraws in between are not
    assert logged[1:] == ["one", "bar 1", "bar done", "last"]
    assert flows._run([PY, "-c", "print('ok')"], tmp_path, flows._logger(), echo=False) == ["ok"]


# --- the flow end to end (ephemeral Prefect server) ------------------------------------------------------------

READ_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

async def main():
    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pte-evaluation", "pte-registration"])))
        runs = await client.read_flow_runs()
        tasks = await client.read_task_runs()
    print(json.dumps({"artifacts": {a.key: {"type": a.type, "data": a.data} for a in arts},
                      "flow_runs": [r.state_type.value for r in runs],
                      "tasks": {t.name: t.state_type.value for t in tasks}}))

asyncio.run(main())
"""


# The real smoke pipeline (~160 s of `dvc repro` here, evaluate alone ~80 s) plus two ephemeral-server starts:
# 190-200 s measured on 2 shared cores, over the ~3 min budget of the default run.
@pytest.mark.slow
def test_pipeline_flow_end_to_end_on_smoke(tmp_path):
    from mlflow import MlflowClient

    clone = _clone(tmp_path / "repo")
    env = _env(tmp_path / "prefect", clone)
    proc = subprocess.run([PY, "flows/pipeline.py", "--preset", "smoke"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    (tmp_path / "flow.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    summary = json.loads(re.search(r"^\{$.*^\}$", proc.stdout, re.M | re.S).group(0))
    assert summary["params_switched"] is True and summary["preset"] == "smoke"
    assert list(summary["stages"]) == STAGES and set(summary["stages"].values()) == {"ran"}, summary["stages"]
    assert (clone / "params.yaml").read_bytes() == (clone / "presets" / "smoke.yaml").read_bytes()
    for out in ("models/pte/adapter", "reports/evaluate/metrics.json", "reports/register/registration.json"):
        assert (clone / out).exists(), out
    status = subprocess.run([_exe("dvc"), "status", "--json"], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    # everything the run wrote is committed (dvc.lock, `cache: false` outputs) or git-ignored (DVC-cached outputs,
    # side files, MLflow): nothing new for `git status` (docs/pipeline.md, "What is committed")
    porcelain = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                               capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert not [line for line in porcelain if line.startswith("??")], porcelain

    reg = json.loads((clone / "reports/register/registration.json").read_text())
    assert summary["registration"] == reg
    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    assert client.get_run(reg["run_id"]).info.run_id == reg["run_id"]
    champion = client.get_model_version_by_alias(reg["name"], "champion")
    assert str(champion.version) == str(reg["version"]) and reg["alias"] == "champion"

    # what the Prefect UI shows: the flow run, one task per stage, the two markdown artifacts
    seen = subprocess.run([PY, "-c", READ_RUNS], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert seen.returncode == 0, _tail(seen.stdout + seen.stderr)
    seen = json.loads(seen.stdout.strip().splitlines()[-1])
    assert seen["flow_runs"] == ["COMPLETED"]
    assert {f"dvc-repro-{s}" for s in STAGES} <= set(seen["tasks"]) and set(seen["tasks"].values()) == {"COMPLETED"}
    evaluation, registration = seen["artifacts"]["pte-evaluation"], seen["artifacts"]["pte-registration"]
    assert evaluation["type"] == registration["type"] == "markdown"
    assert (clone / "reports/evaluate/metrics.md").read_text().strip() in evaluation["data"]
    assert f"`{reg['name']}` version {reg['version']} as `champion`" in registration["data"]
    assert f"mlflow ui --backend-store-uri sqlite:///{clone}/mlflow.db" in registration["data"]
    assert not _processes_of(tmp_path / "prefect"), "the ephemeral Prefect server outlived its flow run"


# --- a real local Prefect server: prefect.yaml deployments and a served schedule ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _stop_group(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM, wait: float = 30.0) -> None:
    """Stop a process started with start_new_session: ``first`` to the leader, then SIGKILL to what is left."""
    if proc.poll() is None:
        proc.send_signal(first)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _processes_of(home: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("PREFECT_HOME") == str(home):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on a free port with its own PREFECT_HOME; stopped and checked for leftovers."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([_exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=home, env=_env(home, home), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _api(f"{url}/health") is True:
                    break
            except OSError:
                pass
            assert proc.poll() is None, _tail((home / "server.log").read_text())
            assert time.monotonic() < deadline, "prefect server not healthy after 120 s"
            time.sleep(1)
        yield SimpleNamespace(url=url, home=home, clone=_clone(home / "repo"))
    finally:
        _stop_group(proc)
        log.close()
        left = _processes_of(home)
        for p in left:
            p.kill()
        assert not left, f"left over after stopping the server: {[p.cmdline() for p in left]}"


def _prefect(server, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([_exe("prefect"), *args], cwd=server.clone, env=_env(server.home, server.clone, server.url),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{_tail(proc.stdout + proc.stderr)}"
    return proc.stdout


def test_prefect_yaml_deploys_and_a_process_worker_runs_nightly(server):
    clone, template = server.clone, server.clone / "k8s/overlays/prefect-worker/base-job-template.json"
    _prefect(server, "work-pool", "create", "pte-process", "--type", "process")
    _prefect(server, "work-pool", "create", "pte-k8s", "--type", "kubernetes", "--base-job-template", str(template))
    _prefect(server, "--no-prompt", "deploy", "--all")

    nightly = _api(f"{server.url}/deployments/name/pte-pipeline/nightly")
    assert nightly["work_pool_name"] == "pte-process" and nightly["parameters"] == {"preset": "cpu-demo"}
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in nightly["schedules"]] == \
        [("0 2 * * *", "UTC", True)]
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}}]
    paper = _api(f"{server.url}/deployments/name/pte-pipeline/cluster-paper")
    assert paper["work_pool_name"] == "pte-k8s" and paper["schedules"] == []
    assert paper["parameters"] == {"preset": "paper"} and paper["job_variables"] == {"gpu_limit": 1}
    assert paper["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/workspace"}}]

    out = _prefect(server, "deployment", "run", "pte-pipeline/nightly", "--param", "preset=smoke",
                   "--param", 'stages=["data"]', "--param", f"repo={clone}")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    _prefect(server, "worker", "start", "--pool", "pte-process", "--run-once", "--install-policy", "never",
             timeout=300)
    run = _api(f"{server.url}/flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED", run["state"]
    assert (clone / "data" / "train.jsonl").is_file()


def test_served_deployment_runs_on_its_schedule(server):
    env = _env(server.home, server.clone, server.url, PREFECT_RUNNER_POLL_FREQUENCY="2")
    log_path = server.home / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([PY, "flows/pipeline.py", "--serve", "--name", "every-10s", "--interval", "10",
                                  "--preset", "smoke", "--stages", "data", "--repo", str(server.clone)],
                                 cwd=server.clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            query = {"deployments": {"name": {"any_": ["every-10s"]}},
                     "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
            deadline = time.monotonic() + 180
            while not [r for r in _api(f"{server.url}/flow_runs/filter", query) if r["auto_scheduled"]]:
                assert serve.poll() is None, _tail(log_path.read_text())
                assert time.monotonic() < deadline, "no scheduled run completed in 180 s:\n" + \
                    _tail(log_path.read_text())
                time.sleep(2)
        finally:
            # stop the serve process before the server, or it hangs on shutdown
            _stop_group(serve, first=signal.SIGINT)
    assert "Finished in state Completed()" in log_path.read_text()
