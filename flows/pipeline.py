"""The DVC pipeline as a Prefect flow: one task per DVC stage, result artifacts for the Prefect UI.

Wiring only. DVC stays the source of truth: every task is a ``dvc repro`` subprocess, so a stage whose
dependencies did not change is skipped by DVC itself, and a re-run after a failure redoes only what is missing
(training resumes from its checkpoints). The stages and their order come from ``dvc stage list`` (``dvc.yaml``
order, ``foreach`` stages such as ``train@pte`` expanded from ``params.yaml``). After ``evaluate`` the metric table
becomes a markdown artifact; after ``register`` the registered MLflow model version, its alias and a link to its run.

This module knows nothing about training or evaluation; ``pte/`` never imports it.

Run once:            python flows/pipeline.py --preset smoke
Serve on a schedule: python flows/pipeline.py --serve                 (deployment pte-pipeline/nightly, 02:00 UTC)
Deployments:         prefect.yaml (``prefect deploy --all``, then a worker on the work pool).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.exceptions import MissingContextError

__all__ = ["dvc_repro", "main", "pipeline", "select_targets", "subprocess_env", "use_preset"]

# Offline and no telemetry (docs/pipeline.md). Defaults only: a value already in the environment wins (the paper
# preset on k8s sets HF_*_OFFLINE=0).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
}
# Retries only where a failure is likely transient I/O (hub downloads, the MLflow server). A failed training or
# evaluation must surface: re-running the flow resumes it (DVC skips finished stages, training has checkpoints).
RETRIES = {"base_model": 2, "data": 2, "register": 2}
RETRY_DELAY_S = 10
TAIL_LINES = 40
PROGRESS_EVERY_S = 30.0
EVALUATION_ARTIFACT = "pte-evaluation"
REGISTRATION_ARTIFACT = "pte-registration"
RUN_LINK_ARTIFACT = "pte-mlflow-run"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger (logs reach the Prefect UI); a plain logger when called outside a flow run (tests, scripts)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows.pipeline")


def subprocess_env() -> dict[str, str]:
    """Environment of the DVC subprocesses: ours plus the offline / no-telemetry defaults, this venv first on PATH."""
    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    # `dvc` and the `pte` commands of dvc.yaml must come from the interpreter running the flow
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name) or name


def _segments(stream: IO[bytes]) -> Iterator[tuple[str, bool]]:
    """Output pieces as ``(text, is_redraw)``: a piece ended by ``\\r`` is a progress-bar redraw."""
    buf = b""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        buf += chunk
        while (cut := min((i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0), default=-1)) >= 0:
            piece, end, buf = buf[:cut], buf[cut:cut + 1], buf[cut + 1:]
            yield piece.decode(errors="replace").rstrip(), end == b"\r"
    if buf:
        yield buf.decode(errors="replace").rstrip(), False


def _run(cmd: list[str], cwd: Path, log: Any, echo: bool = True) -> list[str]:
    """Run ``cmd``, log its output line by line (``echo``; progress redraws at most every 30 s); raise with the tail.

    Returns:
        The output lines (without the skipped progress redraws).
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log.info("$ %s  (in %s)", " ".join(cmd), cwd)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{cmd[0]!r} not found: install the project (`pip install -e .`) in the interpreter "
                           f"running the flow ({sys.executable}).") from exc
    lines: list[str] = []
    last_redraw = 0.0
    assert proc.stdout is not None
    with proc:
        for text, redraw in _segments(proc.stdout):
            if not text or (redraw and time.monotonic() - last_redraw < PROGRESS_EVERY_S):
                continue
            if redraw:
                last_redraw = time.monotonic()
            if echo:
                log.info("%s", text)
            tail.append(text)
            lines.append(text)
    if proc.returncode != 0:
        shown = "\n".join(tail)
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} in {cwd}. "
                           f"Last {len(tail)} lines of its output:\n{shown}")
    return lines


@task(name="use-preset", cache_policy=NO_CACHE)
def use_preset(repo: str, preset: str | None) -> bool:
    """Copy ``presets/<preset>.yaml`` over ``params.yaml`` when they differ (the documented preset switch).

    Returns:
        True when ``params.yaml`` changed; None or "" keeps ``params.yaml`` as it is.
    """
    log = _logger()
    root = Path(repo)
    if not preset:
        log.info("preset: none given, using params.yaml as it is")
        return False
    available = sorted(p.stem for p in (root / "presets").glob("*.yaml"))
    src = root / "presets" / f"{preset}.yaml"
    if Path(preset).name != preset or not src.is_file():
        raise ValueError(f"unknown preset {preset!r}: available presets are {available} (presets/<name>.yaml in "
                         f"{root}).")
    dst = root / "params.yaml"
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        log.info("preset %s: params.yaml already holds it", preset)
        return False
    shutil.copyfile(src, dst)
    log.info("preset %s: copied presets/%s.yaml to params.yaml", preset, preset)
    return True


def select_targets(available: list[str], stages: list[str] | None) -> list[str]:
    """The DVC targets to run, in pipeline order: all of them, or those named (``train`` = every ``train@...``)."""
    if not stages:
        return list(available)
    unknown = [s for s in stages if not any(t == s or t.split("@", 1)[0] == s for t in available)]
    if unknown:
        names = sorted({t.split("@", 1)[0] for t in available} | set(available))
        raise ValueError(f"unknown stage(s) {unknown}: the pipeline's stages are {names}.")
    return [t for t in available if t in stages or t.split("@", 1)[0] in stages]


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(target: str, repo: str, force: bool = False) -> str:
    """``dvc repro <target>``; DVC skips it when nothing it depends on changed.

    Without ``force`` DVC also brings out-of-date upstream stages up to date (none when the flow runs the stages
    in order). ``force`` re-runs exactly this stage (``--force --single-item``).

    Returns:
        ``"ran"`` or ``"up to date"``.
    """
    cmd = [_executable("dvc"), "repro", *(["--force", "--single-item"] if force else []), target]
    lines = _run(cmd, Path(repo), _logger())
    return "ran" if any(line.startswith(f"Running stage '{target}'") for line in lines) else "up to date"


def _tracking_uri(root: Path) -> str:
    from pte.config import load_params  # the one reader of params.yaml; light (no torch, no mlflow)

    return load_params(root / "params.yaml").tracking.resolved_uri(cwd=root)


def publish_evaluation(root: Path, preset: str | None) -> str | None:
    """The evaluate stage's metric table as the markdown artifact ``pte-evaluation``."""
    table = root / "reports" / "evaluate" / "metrics.md"
    if not table.is_file():
        _logger().warning("no %s: no evaluation artifact", table)
        return None
    create_markdown_artifact(key=EVALUATION_ARTIFACT, markdown=f"# PTE evaluation (preset {preset or 'params.yaml'})"
                             f"\n\n{table.read_text()}\n\nFrom `{table}`; `dvc metrics show` lists every metric.",
                             description="Accuracy per method and KV-cache budget (reports/evaluate/metrics.md)")
    return EVALUATION_ARTIFACT


def _registration_markdown(reg: dict[str, Any], uri: str) -> tuple[str, str | None]:
    name, version, alias, run_id = reg.get("name"), reg.get("version"), reg.get("alias"), reg.get("run_id")
    http = uri.split(":", 1)[0].lower() in ("http", "https")
    base = uri.rstrip("/")
    run_url = f"{base}/#/runs/{run_id}" if http and run_id else None
    run_cell = f"[{run_id}]({run_url})" if run_url else f"`{run_id}`"
    rows = [("model", f"`{name}`"), ("version", f"{version}"), ("alias", f"`{alias}`"),
            ("metric", f"{reg.get('metric')} (budget {reg.get('budget', 'n/a')})"),
            ("previous champion", f"{reg.get('previous_champion') or 'none'}"),
            ("MLflow run", run_cell), ("model URI", f"`{reg.get('model_uri')}`"), ("tracking URI", f"`{uri}`")]
    md = [f"# Registered `{name}` version {version} as `{alias}`", "", "| | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += ["", f"Load it: `mlflow.pyfunc.load_model(\"models:/{name}@{alias}\")`."]
    if http:
        md.append(f"Model version in the MLflow UI: {base}/#/models/{name}/versions/{version}")
    else:
        md.append(f"Open the MLflow UI with `mlflow ui --backend-store-uri {uri}` and go to "
                  f"http://127.0.0.1:5000/#/runs/{run_id}")
    return "\n".join(md) + "\n", run_url


def publish_registration(root: Path) -> dict[str, Any] | None:
    """``reports/register/registration.json`` as the markdown artifact ``pte-registration`` (+ a run link)."""
    path = root / "reports" / "register" / "registration.json"
    if not path.is_file():
        _logger().warning("no %s: no registration artifact", path)
        return None
    reg = json.loads(path.read_text())
    markdown, run_url = _registration_markdown(reg, _tracking_uri(root))
    create_markdown_artifact(key=REGISTRATION_ARTIFACT, markdown=markdown,
                             description="MLflow model version and alias of the trained PTE adapter")
    if run_url:
        create_link_artifact(key=RUN_LINK_ARTIFACT, link=run_url, link_text=f"MLflow run {reg.get('run_id')}")
    return reg


@flow(name="pte-pipeline")
def pipeline(preset: str | None = "cpu-demo", stages: list[str] | None = None, force: bool = False,
             repo: str = ".") -> dict[str, Any]:
    """Reproduce the PTE pipeline with DVC (base_model → data → warmstart → sensitivity → train@{lora,lora_c,pte} →
    evaluate → register).

    Args:
        preset: copy ``presets/<preset>.yaml`` to ``params.yaml`` first (cpu-demo, smoke, paper); empty = keep
            ``params.yaml`` as it is.
        stages: DVC stages to run, in pipeline order whatever the order given (``train`` = every ``train@<method>``
            of ``train.methods``, or e.g. ``train@pte``); empty = the whole pipeline.
        force: re-run the selected stages even when DVC finds them up to date.
        repo: the project checkout (where ``dvc.yaml`` is); relative to the flow run's working directory.

    Returns:
        ``{"preset", "repo", "params_switched", "stages": {target: "ran" | "up to date"}, "registration",
        "artifacts"}``; ``registration`` is ``reports/register/registration.json`` when ``register`` is selected.
    """
    log = _logger()
    root = Path(repo).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"repo {repo!r} ({root}) has no dvc.yaml: pass the project checkout as repo.")
    switched = use_preset(str(root), preset)
    available = _run([_executable("dvc"), "stage", "list", "--name-only"], root, log, echo=False)
    targets = select_targets(available, stages)
    log.info("DVC targets, in order: %s", ", ".join(targets))
    results: dict[str, str] = {}
    artifacts: list[str] = []
    registration = None
    for target in targets:
        retries = RETRIES.get(target.split("@", 1)[0], 0)
        run_stage = dvc_repro.with_options(task_run_name=f"dvc-repro-{target}", retries=retries,
                                           retry_delay_seconds=RETRY_DELAY_S)
        results[target] = run_stage(target, str(root), force)
        if target == "evaluate" and (key := publish_evaluation(root, preset)):
            artifacts.append(key)
        if target == "register" and (registration := publish_registration(root)) is not None:
            artifacts.append(REGISTRATION_ARTIFACT)
    return {"preset": preset, "repo": str(root), "params_switched": switched, "stages": results,
            "registration": registration, "artifacts": artifacts}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run the PTE pipeline flow once, or serve it on a schedule.")
    ap.add_argument("--preset", default="cpu-demo", help="presets/<name>.yaml to use ('' = params.yaml as is)")
    ap.add_argument("--stages", nargs="+", help="DVC stages to run (default: all), e.g. data train@pte")
    ap.add_argument("--force", action="store_true", help="re-run the stages even when up to date")
    ap.add_argument("--repo", default=".", help="project checkout (default: the working directory)")
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead of running once")
    ap.add_argument("--name", default="nightly", help="deployment name with --serve")
    ap.add_argument("--cron", default="0 2 * * *", help="cron schedule (UTC) with --serve")
    ap.add_argument("--interval", type=float, help="with --serve: every N seconds instead of the cron schedule")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python flows/pipeline.py [--preset P] [--stages ...] [--force] [--repo DIR] [--serve ...]``."""
    args = _parse(argv)
    params = {"preset": args.preset or None, "stages": args.stages, "force": args.force,
              "repo": str(Path(args.repo).resolve())}
    if args.serve:
        from prefect.schedules import Cron, Interval

        schedule = Interval(args.interval, timezone="UTC") if args.interval else Cron(args.cron, timezone="UTC")
        pipeline.serve(name=args.name, schedule=schedule, parameters=params,
                       description="The PTE DVC pipeline on a schedule (flows/pipeline.py --serve).")
        return 0
    print(json.dumps(pipeline(**params), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
