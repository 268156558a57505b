"""The deployment files in deploy/ are consistent with the code: they parse, name real settings and commands,
and the Kubernetes objects are well formed. Fast: no containers, no cluster, no services."""

from __future__ import annotations

import configparser
import ipaddress
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from worker.cli import app
from worker.commands.serve import DEFAULT_HTTP_PORT
from worker.queue.celery_app import QUEUES
from worker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
EXAMPLE_ENV = DEPLOY / "example.env"

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S_FILES = sorted(K8S.glob("*.yaml"))
UNIT_FILES = sorted(SYSTEMD.glob("*.service"))
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
SETTING_NAMES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
VARIABLE = re.compile(r"\bCCFNET_[A-Z0-9_]*[A-Z0-9]")
# A command row of Typer's help: rich ("│ serve   ...") or plain ("  serve   ...").
HELP_ROW = re.compile(r"^(?:│ |  )([a-z][a-z0-9-]*)\s{2,}\S", re.MULTILINE)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(DEPLOY).as_posix() for p in paths]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _k8s_objects(kind: str | None = None) -> list[dict[str, Any]]:
    objects = [doc for path in K8S_FILES for doc in _docs(path)]
    return [o for o in objects if kind is None or o.get("kind") == kind]


def _compose() -> dict[str, Any]:
    return _docs(DEPLOY / "compose.yaml")[0]


def _parse_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value
    return values


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


@cache
def _help_commands(*path: str) -> frozenset[str]:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return frozenset(HELP_ROW.findall(result.output))


def _ccfnet_argv(command: list[str] | str) -> list[str] | None:
    """The arguments after `ccfnet` in a command (list or string, any path to the binary), else None."""
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if not argv or Path(argv[0]).name != "ccfnet":
        return None
    return argv[1:]


def _all_ccfnet_commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for name, service in _compose()["services"].items():
        argv = _ccfnet_argv(service.get("command", []))
        if argv is not None:
            found.append((f"compose:{name}", argv))
    for obj in _k8s_objects():
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            argv = _ccfnet_argv(container.get("command", []) + container.get("args", []))
            if argv is not None:
                found.append((f"k8s:{obj['metadata']['name']}", argv))
    for path in UNIT_FILES:
        argv = _ccfnet_argv(_unit(path)["Service"]["ExecStart"])
        if argv is not None:
            found.append((f"systemd:{path.name}", argv))
    for path in DOCKERFILES:
        match = re.search(r"^CMD\s+(\[.*\])\s*$", path.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            argv = _ccfnet_argv(yaml.safe_load(match.group(1)))
            if argv is not None:
                found.append((f"docker:{path.name}", argv))
    return found


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process gets from exactly these CCFNET_ variables."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def _listening_ports(argv: list[str], settings: Settings) -> dict[str, int]:
    """The TCP ports `ccfnet <argv>` listens on with these settings, by the name a container port should have."""
    if argv[0] == "serve":
        http = settings.http_port if settings.http_port is not None else DEFAULT_HTTP_PORT
        return {"dicom": settings.port, "http": http}
    if argv[0] == "worker" and settings.worker_metrics_port is not None:
        return {"metrics": settings.worker_metrics_port}
    return {}


def _is_loopback(address: str) -> bool:
    """A bind address that a port mapping or a Service cannot reach from outside the container."""
    return address == "localhost" or ipaddress.ip_address(address).is_loopback


# --- everything parses -----------------------------------------------------------------------------------


def test_the_expected_files_exist() -> None:
    for name in ("Dockerfile.listener", "Dockerfile.worker", "compose.yaml", "example.env"):
        assert (DEPLOY / name).is_file(), name
    for name in ("ccfnet-listener.service", "ccfnet-worker@.service", "ccfnet-export.service"):
        assert (SYSTEMD / name).is_file(), name
    assert K8S_FILES, "no Kubernetes manifests"


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} has no documents"
    assert all(isinstance(d, dict) for d in docs)


# --- Kubernetes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", K8S_FILES, ids=_ids(K8S_FILES))
def test_k8s_objects_have_api_version_kind_and_name(path: Path) -> None:
    for doc in _docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "ccfnet", f"{doc['kind']} {doc['metadata']['name']}"


# The oldest Kubernetes release still in upstream support when this was written, and the newest the
# validator knows: the manifests must hold for both.
K8S_VERSIONS = ("1.32", "1.37")
CUSTOM_RESOURCE_GROUPS = ("keda.sh/",)  # KEDA's CRDs: not in the Kubernetes schema, checked below by hand


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_objects_validate_strictly_against_the_kubernetes_schema(version: str) -> None:
    """OpenAPI schema of that Kubernetes release, strict: a misspelt or misplaced field fails (kubectl-free)."""
    import kubernetes_validate

    checked = 0
    for obj in _k8s_objects():
        if obj["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS):
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 8
    listener = next(o for o in _k8s_objects() if o["kind"] == "Deployment")
    broken = {**listener, "spec": {**listener["spec"], "replica": 2}}  # the validator does catch a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_k8s_has_every_required_kind() -> None:
    kinds = {o["kind"] for o in _k8s_objects()}
    assert {
        "Namespace",
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Job",
        "ScaledObject",
    } <= kinds


def test_deployment_selectors_match_template_labels_and_containers_have_resources() -> None:
    deployments = _k8s_objects("Deployment")
    assert len(deployments) >= 3
    for dep in deployments:
        name = dep["metadata"]["name"]
        match_labels = dep["spec"]["selector"]["matchLabels"]
        template_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert match_labels, name
        assert match_labels.items() <= template_labels.items(), f"{name}: selector does not select its pods"
        for container in dep["spec"]["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            assert resources.get("requests"), f"{name}/{container['name']}: no resource requests"
            assert resources.get("limits"), f"{name}/{container['name']}: no resource limits"


def test_gpu_worker_requests_a_gpu_and_only_it_does() -> None:
    gpu_users = []
    for dep in _k8s_objects("Deployment"):
        for container in dep["spec"]["template"]["spec"]["containers"]:
            if str(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", "0")) != "0":
                gpu_users.append((dep["metadata"]["name"], container.get("command", [])))
    assert len(gpu_users) == 1, gpu_users
    name, command = gpu_users[0]
    assert "inference,batch" in command, (name, command)


def test_pods_use_the_configmap_secret_and_shared_volume() -> None:
    config = {o["metadata"]["name"] for o in _k8s_objects("ConfigMap")}
    secrets = {o["metadata"]["name"] for o in _k8s_objects("Secret")}
    claims = {o["metadata"]["name"]: o for o in _k8s_objects("PersistentVolumeClaim")}
    assert all("ReadWriteMany" in c["spec"]["accessModes"] for c in claims.values())
    for obj in [*_k8s_objects("Deployment"), *_k8s_objects("Job")]:
        pod = obj["spec"]["template"]["spec"]
        for container in pod["containers"]:
            refs = container.get("envFrom", [])
            assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= config
            assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secrets
            assert refs, f"{obj['metadata']['name']}: no settings"
        if obj["kind"] == "Deployment":
            volumes = {
                v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
            }
            assert volumes and volumes <= set(claims), obj["metadata"]["name"]


def test_k8s_declares_and_routes_every_port_the_ccfnet_containers_listen_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Named container ports (the probes use the names) match the settings; Services reach the listener's."""
    configmap = _k8s_objects("ConfigMap")[0]["data"]
    services = _k8s_objects("Service")
    seen: set[str] = set()
    for dep in _k8s_objects("Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        for container in dep["spec"]["template"]["spec"]["containers"]:
            argv = _ccfnet_argv(container.get("command", []) + container.get("args", []))
            if argv is None:
                continue
            env = configmap | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            settings = _settings(env, monkeypatch)
            listening = _listening_ports(argv, settings)
            declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            where = f"{dep['metadata']['name']}/{container['name']}"
            assert {name: declared.get(name) for name in listening} == listening, where
            if argv[0] != "serve":
                continue
            assert not _is_loopback(settings.bind_address) and not _is_loopback(settings.http_bind), where
            for name, port in listening.items():
                routed = [
                    s["metadata"]["name"]
                    for s in services
                    if s["spec"]["selector"].items() <= pod_labels.items()
                    and any(p["targetPort"] in (name, port) for p in s["spec"]["ports"])
                ]
                assert routed, f"{where}: no Service routes to its {name} port {port}"
                seen.add(name)
    assert seen == {"dicom", "http"}


def test_keda_scales_the_gpu_worker_on_the_inference_list() -> None:
    deployments = {d["metadata"]["name"]: d for d in _k8s_objects("Deployment")}
    scaled = _k8s_objects("ScaledObject")
    assert scaled
    for obj in scaled:
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        assert "nvidia.com/gpu" in target["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        lists = [t["metadata"]["listName"] for t in obj["spec"]["triggers"] if t["type"] == "redis"]
        assert "inference" in lists
        assert set(lists) <= set(QUEUES)


# --- compose ---------------------------------------------------------------------------------------------


def test_compose_builds_from_dockerfiles_that_exist() -> None:
    services = _compose()["services"]
    built = 0
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = (DEPLOY / (build if isinstance(build, str) else build.get("context", "."))).resolve()
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} missing"
        built += 1
    assert built >= 2


def test_compose_has_the_services_and_a_gpu_reservation() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "listener", "gpu-worker", "export-worker", "flower", "orthanc"} <= set(
        services
    )
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    for name in ("migrate", "listener", "gpu-worker", "export-worker"):
        env_files = services[name]["env_file"]
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            assert (DEPLOY / env_file).is_file(), f"{name}: {env_file}"
        assert any(str(v).startswith("ccfnet-data:") for v in services[name]["volumes"]), name
    assert services["listener"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] in _parse_env(EXAMPLE_ENV)["CCFNET_DATABASE_URL"]


def test_compose_publishes_every_port_the_ccfnet_services_listen_on(monkeypatch: pytest.MonkeyPatch) -> None:
    example = _parse_env(EXAMPLE_ENV)
    seen: set[str] = set()
    for name, service in _compose()["services"].items():
        argv = _ccfnet_argv(service.get("command", []))
        if argv is None:
            continue
        settings = _settings(example | {k: str(v) for k, v in service.get("environment", {}).items()}, monkeypatch)
        listening = _listening_ports(argv, settings)
        # "HOST:CONTAINER" or "ADDRESS:HOST:CONTAINER": the container side is the last part.
        published = {int(str(mapping).rsplit(":", 1)[-1]) for mapping in service.get("ports", [])}
        assert set(listening.values()) <= published, f"{name}: listens on {listening}, publishes {published}"
        if argv[0] == "serve":
            assert not _is_loopback(settings.bind_address) and not _is_loopback(settings.http_bind), name
        seen.update(listening)
    assert seen >= {"dicom", "http"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_dockerfile_exposes_the_ports_its_command_listens_on(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = path.read_text(encoding="utf-8")
    command = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert command is not None
    argv = _ccfnet_argv(yaml.safe_load(command.group(1)))
    assert argv is not None
    listening = _listening_ports(argv, _settings(_parse_env(EXAMPLE_ENV), monkeypatch))
    exposed = {int(port) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE) for port in line.split()}
    assert set(listening.values()) <= exposed


# --- settings and commands -------------------------------------------------------------------------------


def test_every_ccfnet_variable_in_deploy_is_a_setting() -> None:
    unknown: dict[str, set[str]] = {}
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    for path in files:
        for name in VARIABLE.findall(path.read_text(encoding="utf-8", errors="replace")):
            if name not in SETTING_NAMES:
                unknown.setdefault(name, set()).add(path.relative_to(DEPLOY).as_posix())
    assert not unknown, f"not fields of worker.settings.Settings: {unknown}"


def test_example_env_lists_every_setting_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE_ENV.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"^#?(CCFNET_[A-Z0-9_]+)=", text, re.MULTILINE))
    assert mentioned == SETTING_NAMES, {"missing": SETTING_NAMES - mentioned, "extra": mentioned - SETTING_NAMES}
    values = _parse_env(EXAMPLE_ENV)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Empty path variables count as unset; none may end up as the current folder.
    for name, field in Settings.model_fields.items():
        if "Path" in str(field.annotation):
            assert getattr(settings, name) != Path("."), f"{ENV_PREFIX}{name.upper()} is empty in example.env"
    assert not settings.tls_enabled
    assert not settings.uses_sqlite
    assert settings.destinations


def test_env_file_lines_in_deploy_and_docs_have_no_comment_after_the_value() -> None:
    """systemd's EnvironmentFile= (and the install guide's helper) keep a trailing "# ..." as part of the value:
    a copied example line must not carry one. Commented-out settings count, they are there to be uncommented."""
    trailing = re.compile(r"^#?(?:CCFNET_[A-Z0-9_]+|PROMETHEUS_MULTIPROC_DIR)=.*\s#")
    files = [EXAMPLE_ENV, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if trailing.match(line)
    ]
    assert offenders == []


def test_cli_help_lists_the_service_commands() -> None:
    assert {"serve", "worker", "db", "config", "retry-exports", "demo"} <= _help_commands()


def test_every_ccfnet_command_in_deploy_exists() -> None:
    found = _all_ccfnet_commands()
    sources = {source.split(":")[0] for source, _ in found}
    assert sources == {"compose", "k8s", "systemd", "docker"}, sources
    commands = _help_commands()
    for source, argv in found:
        assert argv and argv[0] in commands, f"{source}: `ccfnet {' '.join(argv)}` is not a command"
        # The whole command line parses (`--help` stops before anything runs).
        result = CliRunner().invoke(app, [*argv, "--help"])
        assert result.exit_code == 0, f"{source}: `ccfnet {' '.join(argv)}`: {result.output}"
        if argv[0] == "worker":
            queues = argv[argv.index("-Q") + 1] if "-Q" in argv else "inference,batch"
            assert set(queues.split(",")) <= set(QUEUES), source


# --- systemd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", UNIT_FILES, ids=_ids(UNIT_FILES))
def test_systemd_unit_is_hardened_and_runs_a_real_command(path: Path) -> None:
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "/etc/ccfnet/ccfnet.env"
    assert service["User"] == "ccfnet"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    data_dir = _parse_env(EXAMPLE_ENV)["CCFNET_DATA_DIR"]
    assert data_dir in service["ReadWritePaths"].split()
    argv = _ccfnet_argv(service["ExecStart"])
    assert argv, f"ExecStart does not run ccfnet: {service['ExecStart']}"
    assert argv[0] in _help_commands()


def _unit_environment(path: Path, instance: str) -> dict[str, str]:
    """Every Environment= assignment of a unit (configparser keeps only the last line), %i as `instance`."""
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.removeprefix("Environment=").replace("%i", instance)):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def test_each_systemd_worker_has_its_own_metrics_port_and_prometheus_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared port stops every worker but the first; without PROMETHEUS_MULTIPROC_DIR the prefork children's
    counters never reach /metrics. The env file must not set them: EnvironmentFile= overrides Environment=."""
    example = _parse_env(EXAMPLE_ENV)
    assert "CCFNET_WORKER_METRICS_PORT" not in example and "PROMETHEUS_MULTIPROC_DIR" not in example
    ports: dict[str, int] = {}
    folders: dict[str, str] = {}
    for path in UNIT_FILES:
        service = _unit(path)["Service"]
        argv = _ccfnet_argv(service["ExecStart"])
        if argv is None or argv[0] != "worker":
            continue
        for instance in [str(gpu) for gpu in range(10)] if path.name.endswith("@.service") else [""]:
            name = path.name.replace("@", f"@{instance}")
            env = _unit_environment(path, instance)
            settings = _settings(example | {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, monkeypatch)
            assert settings.worker_metrics_port is not None, name
            assert _is_loopback(settings.http_bind), f"{name}: /metrics would listen on {settings.http_bind}"
            ports[name] = settings.worker_metrics_port
            # An empty folder at each start, writable under ProtectSystem=strict: the unit's RuntimeDirectory.
            folders[name] = env.get("PROMETHEUS_MULTIPROC_DIR", "")
            assert folders[name] == "/run/" + service["RuntimeDirectory"].replace("%i", instance), name
    assert {"ccfnet-export.service", "ccfnet-worker@0.service", "ccfnet-worker@9.service"} <= set(ports)
    listener_http = int(example.get("CCFNET_HTTP_PORT") or DEFAULT_HTTP_PORT)
    assert len(set(ports.values())) == len(ports) and listener_http not in ports.values(), ports
    assert len(set(folders.values())) == len(folders), folders


# --- Dockerfiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_dockerfile_has_from_and_cmd(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^FROM\s+\S+", text, re.MULTILINE), "no FROM"
    assert re.search(r"^CMD\s+\S+", text, re.MULTILINE), "no CMD"
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.MULTILINE), "TORCH_SPEC build arg"
    assert "pip install -e ." in text
