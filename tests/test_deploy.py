"""Static checks of deploy/: the image, the compose stack and the Kubernetes manifests.

Schemas come from packages that bundle them, so these tests work offline:
the Compose Specification from check-jsonschema's vendored schemas, the
Kubernetes API schemas from kubernetes-validate. Every ``walship ...``
invocation in the manifests must resolve to a real CLI command with real
options, and every WALSHIP_* variable must name a real setting with a valid
value. ``docker build`` runs only where a Docker engine answers.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema  # type: ignore[import-untyped]
from click.testing import CliRunner
from pydantic import BaseModel
from walship.consumer.heartbeat import readers_topic
from walship.shared.cli import main as cli_main
from walship.shared.settings import CONFIG_ENV, WalshipSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
COLLECTOR = DEPLOY / "otel-collector.yaml"
K8S = DEPLOY / "k8s"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
# Oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# WALSHIP_* names that are not settings: the config-file pointer and the compose
# interpolation variable that picks the image.
NON_SETTING_VARS = frozenset({CONFIG_ENV, "WALSHIP_IMAGE"})
WALSHIP_VAR = re.compile(r"\bWALSHIP_[A-Z0-9_]*[A-Z0-9]")
SHELLS = frozenset({"sh", "/bin/sh", "bash", "/bin/bash"})


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml_docs(path)]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc["kind"] == kind]


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.glob("*.yaml"), *K8S.glob("*.yaml")])


# --- walship invocations -------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    where: str  # e.g. "compose service reader"
    argv: tuple[str, ...]  # starts with "walship"


def _shell_invocations(script: str) -> Iterator[tuple[str, ...]]:
    """``walship ...`` command lines inside a shell script (one per statement)."""
    for statement in re.split(r"\n|;|&&|\|\|?", script.replace("\\\n", " ")):
        try:
            words = shlex.split(statement, comments=True)
        except ValueError as exc:
            raise AssertionError(f"unparsable shell statement {statement!r}: {exc}") from exc
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:1] == ["walship"]:
            yield tuple(words)


def _invocations_of(
    where: str, entrypoint: list[str] | None, command: list[str] | None
) -> list[Invocation]:
    """Invocations for an image whose ENTRYPOINT is ["walship"], given overrides."""
    command = list(command or [])
    if entrypoint is None:
        return [Invocation(where, ("walship", *command))] if command else []
    argv = [*entrypoint, *command]
    if argv[:1] == ["walship"]:
        return [Invocation(where, tuple(argv))]
    flags = [a for a in argv[1:] if a.startswith("-")]
    if argv[0] in SHELLS and any("c" in f.lstrip("-") for f in flags if not f.startswith("--")):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        found = [Invocation(where, inv) for inv in _shell_invocations(script)]
        assert found, f"{where}: shell command runs no walship command: {script!r}"
        return found
    raise AssertionError(f"{where}: cannot tell what {argv!r} runs")


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _compose_unescape(words: list[str] | None) -> list[str] | None:
    # Compose turns "$$" into a literal "$" for the container.
    return None if words is None else [w.replace("$$", "$") for w in words]


def is_walship_service(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def compose_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for name, service in compose()["services"].items():
        if is_walship_service(service):
            found += _invocations_of(
                f"compose service {name}",
                _compose_unescape(_as_list(service.get("entrypoint"))),
                _compose_unescape(_as_list(service.get("command"))),
            )
    return found


def walship_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, workload, container) for every walship container in the manifests."""
    for path, doc in k8s_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec is None:
            continue
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            if str(container["image"]).split(":")[0].endswith("walship"):
                where = f"{path.name} {doc['kind']}/{doc['metadata']['name']} {container['name']}"
                yield where, doc, container


def k8s_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for where, _, container in walship_containers():
        # Kubernetes expands $(VAR) in command/args from the container's env.
        found += _invocations_of(where, container.get("command"), container.get("args"))
    return found


def all_invocations() -> list[Invocation]:
    return compose_invocations() + k8s_invocations()


def docs_invocations() -> list[Invocation]:
    """Command lines in the operations guide's shell blocks."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    found: list[Invocation] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        found += [Invocation("docs/operations.md", inv) for inv in _shell_invocations(block)]
    return found


def docs_mentions() -> list[tuple[str, ...]]:
    """Command names quoted inline in the operations guide (`walship status`, ...)."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    return sorted({tuple(m.split()) for m in re.findall(r"`(walship(?: [a-z][a-z-]*)+)", text)})


def resolve_command(
    argv: tuple[str, ...], *, group_ok: bool = False
) -> tuple[list[str], click.Command, list[str]]:
    """Walk ``argv`` down walship's click groups: (command path, command, its arguments).

    Skips (naming the command) only when the module that defines a command group
    has not been written yet; a module that exists but lacks the command fails.
    ``group_ok`` accepts a line that names only a group (prose: `walship snapshot`).
    """
    command: click.Command = cli_main.main
    path: list[str] = []
    rest = list(argv[1:])
    while isinstance(command, click.Group):
        if group_ok and path and not rest:
            break
        assert rest, f"{' '.join(argv)!r} stops at the group 'walship {' '.join(path)}'"
        name = rest.pop(0)
        ctx = click.Context(command, info_name=" ".join(["walship", *path]))
        sub = command.get_command(ctx, name)
        if sub is None and not path:
            module = {**cli_main._REQUIRED, **cli_main._OPTIONAL}.get(name, ("", ""))[0]
            if module and not cli_main._module_exists(module):
                pytest.skip(f"walship {name}: its module {module} has not landed yet")
        assert sub is not None, f"'walship {' '.join([*path, name])}' is not a walship command"
        path.append(name)
        command = sub
    return path, command, rest


def option_names(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


# --- parsing and schemas -------------------------------------------------------


def test_deploy_files_exist() -> None:
    for path in (DOCKERFILE, COMPOSE, COLLECTOR, ROOT / ".dockerignore", OPERATIONS_DOC):
        assert path.is_file(), path
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    } <= kinds


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def compose_validator() -> jsonschema.protocols.Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def test_compose_matches_compose_spec() -> None:
    errors = [f"{e.json_path}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_validator_rejects_mistakes() -> None:
    # The schema check above can fail: a misspelt key and an unknown value are caught.
    broken = copy.deepcopy(compose())
    broken["services"]["reader"]["comand"] = ["consumer", "run"]
    assert not compose_validator().is_valid(broken)
    broken = copy.deepcopy(compose())
    broken["services"]["reader"]["depends_on"]["kafka-setup"]["condition"] = "service_ready"
    assert not compose_validator().is_valid(broken)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_kubernetes_schemas(version: str) -> None:
    for path, doc in k8s_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc.get('kind')}: {'.'.join(map(str, exc.path))}: {exc}")


def test_k8s_validator_rejects_mistakes() -> None:
    (reader,) = [s for s in k8s_kind("StatefulSet") if s["metadata"]["name"] == "walship-reader"]
    broken = copy.deepcopy(reader)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    broken = copy.deepcopy(reader)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# --- the CLI behind every command line -------------------------------------------


def test_manifests_run_walship_commands() -> None:
    runs = {inv.argv[1:3] for inv in all_invocations()}
    for expected in [("writer", "load"), ("producer", "run"), ("consumer", "run")]:
        assert expected in runs, f"no manifest runs walship {' '.join(expected)}"


@pytest.mark.parametrize(
    "invocation",
    all_invocations() + docs_invocations(),
    ids=lambda inv: f"{inv.where}: {' '.join(inv.argv[:3])}",
)
def test_invocation_is_a_real_command(
    monkeypatch: pytest.MonkeyPatch, invocation: Invocation
) -> None:
    path, command, args = resolve_command(invocation.argv)
    result = CliRunner().invoke(cli_main.main, [*path, "--help"])
    assert result.exit_code == 0, f"walship {' '.join(path)} --help: {result.output}"
    known = option_names(command)
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert option in known, (
                f"{invocation.where}: walship {' '.join(path)} has no option {option} "
                f"(it has {sorted(known)})"
            )
    # Parse the arguments as the command would (without running it): required
    # options, choices and value types are checked, with no WALSHIP_* variable
    # of this machine filling in.
    _clear_env(monkeypatch)
    # Files named here exist where the command runs (a container), not on this
    # machine: existence is not checked, everything else is.
    for param in command.params:
        if isinstance(param.type, click.Path) and param.type.exists:
            monkeypatch.setattr(param.type, "exists", False)
    try:
        command.make_context(" ".join(["walship", *path]), list(args))
    except click.ClickException as exc:
        pytest.fail(f"{invocation.where}: {' '.join(invocation.argv)}: {exc.format_message()}")


@pytest.mark.parametrize("words", docs_mentions(), ids=" ".join)
def test_docs_name_real_commands(words: tuple[str, ...]) -> None:
    path, _, _ = resolve_command(words, group_ok=True)
    result = CliRunner().invoke(cli_main.main, [*path, "--help"])
    assert result.exit_code == 0, f"walship {' '.join(path)} --help: {result.output}"


# --- settings ----------------------------------------------------------------------


def setting_exists(var: str) -> bool:
    """True if WALSHIP_A__B names a field path a.b of WalshipSettings."""
    model: type[BaseModel] = WalshipSettings
    parts = var.removeprefix("WALSHIP_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i == len(parts) - 1:
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return False


def test_setting_lookup_can_fail() -> None:
    assert setting_exists("WALSHIP_KAFKA__BOOTSTRAP_SERVERS")
    assert not setting_exists("WALSHIP_KAFKA__BOOTSTRAP_SERVER")
    assert not setting_exists("WALSHIP_DATA_DIR__X")


def test_every_walship_variable_is_a_setting() -> None:
    # Raw text, so commented-out examples and the docs are checked too.
    files = [*yaml_files(), DOCKERFILE, OPERATIONS_DOC]
    unknown = sorted(
        f"{path.relative_to(ROOT)}: {var}"
        for path in files
        for var in set(WALSHIP_VAR.findall(path.read_text(encoding="utf-8")))
        if var not in NON_SETTING_VARS and not setting_exists(var)
    )
    assert not unknown, "not walship settings:\n" + "\n".join(unknown)


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("WALSHIP_") or var.startswith("OTEL_"):
            monkeypatch.delenv(var)


def _load_with_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> WalshipSettings:
    _clear_env(monkeypatch)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return load_settings()


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items() if v is not None}


@pytest.mark.parametrize(
    "name", [n for n, s in compose()["services"].items() if is_walship_service(s)]
)
def test_compose_service_settings_load(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    settings = _load_with_env(monkeypatch, compose_env(compose()["services"][name]))
    assert settings.data_dir == Path("/data")
    assert settings.topic.name == "walship"


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's literal environment as Kubernetes would build it."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in k8s_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in k8s_kind("Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            value = "walship-pod-0"
        else:
            raise AssertionError(f"{container['name']}: unexpected env source {item}")
        env[item["name"]] = value
    return env


@pytest.mark.parametrize("where", [w for w, _, _ in walship_containers()])
def test_k8s_container_settings_load(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    (container,) = [c for w, _, c in walship_containers() if w == where]
    settings = _load_with_env(monkeypatch, container_env(container))
    assert settings.data_dir == Path("/data")


# --- compose stack shape -----------------------------------------------------------


def test_compose_kafka_is_a_three_node_kraft_cluster() -> None:
    services = compose()["services"]
    brokers = {
        n: s for n, s in services.items() if str(s.get("image", "")).startswith("apache/kafka")
    }
    nodes = {n: s for n, s in brokers.items() if "KAFKA_NODE_ID" in (s.get("environment") or {})}
    assert len(nodes) == 3
    voters = {f"{s['environment']['KAFKA_NODE_ID']}@{n}:9093" for n, s in nodes.items()}
    for name, service in nodes.items():
        env = service["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", name
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters, name
        assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"], name
        assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"], name
        assert "CLUSTER_ID" in env
    assert len({s["environment"]["CLUSTER_ID"] for s in nodes.values()}) == 1


def _topic_creations(script: str) -> dict[str, list[str]]:
    created: dict[str, list[str]] = {}
    for statement in script.replace("\\\n", " ").splitlines():
        words = shlex.split(statement)
        if "--create" in words:
            assert "--if-not-exists" in words, statement
            created[words[words.index("--topic") + 1]] = words
    return created


def test_compose_topic_setup_matches_walship_settings() -> None:
    services = compose()["services"]
    setup = services["kafka-setup"]
    created = _topic_creations("\n".join(_as_list(setup["command"]) or []))
    env = compose_env(services["publisher"])
    stream = created[env["WALSHIP_TOPIC__NAME"]]
    assert stream[stream.index("--partitions") + 1] == env["WALSHIP_TOPIC__PARTITIONS"]
    assert stream[stream.index("--replication-factor") + 1] == "3"
    assert "min.insync.replicas=2" in stream
    snapshots_topic = env["WALSHIP_SNAPSHOT_URL"].removeprefix("kafka://")
    assert "cleanup.policy=compact" in created[snapshots_topic]
    # Heartbeats for `walship status`: latest per reader, so compacted.
    assert "cleanup.policy=compact" in created[readers_topic(env["WALSHIP_TOPIC__NAME"])]
    for name in ("writer", "publisher", "reader"):
        depends = services[name]["depends_on"]
        assert depends["kafka-setup"]["condition"] == "service_completed_successfully"


def test_compose_readers_scale() -> None:
    reader = compose()["services"]["reader"]
    # --scale needs no fixed name and no host port; ids come from the hostname.
    assert "container_name" not in reader
    assert "ports" not in reader
    assert "hostname" not in reader
    (invocation,) = [i for i in compose_invocations() if i.where == "compose service reader"]
    argv = list(invocation.argv)
    assert argv[argv.index("--reader-id") + 1] == "${HOSTNAME}"
    assert "/healthz" in " ".join(reader["healthcheck"]["test"])


def test_compose_references_resolve() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} not declared"
        build = service.get("build")
        if isinstance(build, dict):
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    endpoint = compose_env(services["reader"])["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert re.fullmatch(r"http://otel-collector:4318", endpoint)
    assert str(services["otel-collector"]["image"]).startswith("otel/opentelemetry-collector")
    assert str(services["jaeger"]["image"]).startswith("jaegertracing/all-in-one")
    assert "16686:16686" in services["jaeger"]["ports"]


def test_collector_pipelines_are_wired() -> None:
    (config,) = load_yaml_docs(COLLECTOR)
    for pipeline, spec in config["service"]["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            for component in spec.get(section, []):
                assert component in config[section], f"{pipeline}: {section} {component} undefined"
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    jaeger = [e for e in traces["exporters"] if e.startswith("otlp")]
    assert jaeger and config["exporters"][jaeger[0]]["endpoint"] == "jaeger:4317"


# --- Kubernetes shape --------------------------------------------------------------


def test_k8s_workloads_are_hardened_and_sized() -> None:
    for where, workload, container in walship_containers():
        spec = workload["spec"]["template"]["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] != 0, where
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: volume {mount['name']}"
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                port = container[probe]["httpGet"]["port"]
                assert port in {p["name"] for p in container.get("ports", [])}, where


def _statefulset(name: str) -> dict[str, Any]:
    (found,) = [s for s in k8s_kind("StatefulSet") if s["metadata"]["name"] == name]
    return found


def test_k8s_writer_and_readers() -> None:
    writer = _statefulset("walship-writer")
    assert writer["spec"]["replicas"] == 1
    assert writer["spec"]["volumeClaimTemplates"]
    containers = {c["name"]: c for c in writer["spec"]["template"]["spec"]["containers"]}
    publisher = containers["publisher"]
    assert publisher["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert publisher["livenessProbe"]["httpGet"]["path"] == "/healthz"

    reader = _statefulset("walship-reader")
    assert reader["spec"]["replicas"] >= 2
    assert reader["spec"]["volumeClaimTemplates"]
    (container,) = reader["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    reader_id = [e for e in container["env"] if e["name"] == "WALSHIP_CONSUMER__READER_ID"]
    assert reader_id == [
        {
            "name": "WALSHIP_CONSUMER__READER_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }
    ]


def test_k8s_selectors_match() -> None:
    pods = {
        s["metadata"]["name"]: s["spec"]["template"]["metadata"]["labels"]
        for s in k8s_kind("StatefulSet")
    }
    for statefulset in k8s_kind("StatefulSet"):
        labels = pods[statefulset["metadata"]["name"]]
        assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (service,) = [
            s
            for s in k8s_kind("Service")
            if s["metadata"]["name"] == statefulset["spec"]["serviceName"]
        ]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods["walship-reader"].items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= pods["walship-writer"].items()


def test_k8s_secret_is_a_documented_placeholder() -> None:
    (secret,) = k8s_kind("Secret")
    assert set(secret["stringData"]) == {"WALSHIP_KAFKA__SASL_PASSWORD"}
    assert "data" not in secret
    text = (K8S / "secret.yaml").read_text(encoding="utf-8")
    assert "placeholder" in text and "kubectl create secret" in text
    for configmap in k8s_kind("ConfigMap"):
        assert not any("PASSWORD" in key for key in configmap["data"])


# --- the image -------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatch(parts[-1], pattern[3:])
        ):
            ignored = not negate
    return ignored


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) == 2, "builder + runtime"
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert "pip wheel" in runs
    assert '"walship[otlp]"' in runs
    assert not re.search(r"\[[^\]]*\bdev\b", runs), "the dev extra stays out of the image"
    (user,) = [a for op, a in instructions if op == "USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    (entrypoint,) = [a for op, a in instructions if op == "ENTRYPOINT"]
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert entrypoint == '["walship"]' and "walship" in scripts
    assert ("VOLUME", '["/data"]') in instructions


def test_dockerfile_copies_are_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for op, args in dockerfile_instructions():
        if op == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not dockerignored(source.rstrip("/"), patterns), source
    for excluded in (".venv", ".git", "tests/test_deploy.py", "shared/__pycache__/x.pyc"):
        assert dockerignored(excluded, patterns), excluded
    assert not dockerignored("shared/settings.py", patterns)


def docker_engine() -> str | None:
    """None if a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return f"`docker info` failed: {lines[-1] if lines else probe.returncode}"
    return None


@pytest.mark.timeout(1800)
def test_docker_build() -> None:
    reason = docker_engine()
    if reason is not None:
        pytest.skip(f"no Docker engine reachable, image not built: {reason}")
    tag = f"walship-test:{uuid.uuid4().hex[:12]}"
    try:
        subprocess.run(
            ["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
            check=True,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        )
        result = subprocess.run(
            ["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, check=True
        )
        assert "walship" in result.stdout
        uid = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert uid.stdout.strip() == "10001"
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
