"""The container images, built here and run from their built filesystems (issue 11).

scripts/build-images.sh builds docker/Dockerfile.worker and docker/Dockerfile.producer with buildah
on a Debian base made with debootstrap (no Docker engine and no registry on this machine), the
worker with the CPU build of torch. Each test then runs what the image itself declares -- its
ENTRYPOINT, CMD, USER, ENV, HEALTHCHECK -- chrooted into a working container of the image
(`buildah run --isolation chroot --network host`), against the loopback Redis and SeaweedFS of
tests/conftest.py. Nothing of the host's venv is visible inside: a broken COPY, a dependency missing
from a pyproject.toml or a wrong entrypoint fails here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings

from tests.services import S3Endpoint, Service, free_port
from tests.support import http, stack_env, wait_for, write_artifact

BUILD_TIMEOUT_S = 2400  # a cold build: debootstrap, torch and every dependency (measured in docs/deploy.md)
# The first test to need the images waits for their build (BUILD_TIMEOUT_S).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 600)]

REPO = Path(__file__).resolve().parent.parent
TAG = "smoke"
WORKER_NODE = "image@smoke-test"
MODEL_IN_IMAGE = "/models/tiny"


@dataclass
class Image:
    name: str
    size_bytes: int
    config: dict[str, Any]  # Docker image config: Entrypoint, Cmd, User, Env, WorkingDir, Healthcheck

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.config.get("Cmd") or [])


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    """Both images, built (or taken from the layer cache) by the script CI and users run."""
    env = {**os.environ, "PIXQ_IMAGE_TAG": TAG}
    try:
        done = subprocess.run(["bash", str(REPO / "scripts" / "build-images.sh")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/build-images.sh ran past {BUILD_TIMEOUT_S} s: {str(exc.stdout)[-3000:]}")
    write_artifact("images-build.log", (done.stdout + done.stderr).encode())
    assert done.returncode == 0, f"scripts/build-images.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    sizes = {line.split()[1]: int(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("size ")}
    found = {}
    for kind in ("worker", "producer"):
        name = f"localhost/pixq-{kind}:{TAG}"
        inspected = json.loads(buildah("inspect", "--type", "image", name))
        found[kind] = Image(name, sizes[name], inspected["Docker"]["config"])
        print(f"image {name}: {sizes[name] / 1e6:.0f} MB")
    return found


class Container:
    """A working container of one image; each `run` is a process chrooted into its filesystem,
    with the image's user, environment and working directory."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.id = buildah("from", "--pull-never", image.name).strip()

    def argv(self, command: list[str], env: dict[str, str] | None = None,
             volumes: dict[str, str] | None = None) -> list[str]:
        argv = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        for host, inside in (volumes or {}).items():
            argv += ["--volume", f"{host}:{inside}:ro"]
        return [*argv, self.id, "--", *command]

    def run(self, command: list[str], env: dict[str, str] | None = None, timeout: float = 120,
            volumes: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command, env, volumes), capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None,
              volumes: dict[str, str] | None = None) -> Running:
        return Running(Service(name, self.argv(command, env, volumes), log_path).start())

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.id], capture_output=True, timeout=60)


@dataclass
class Running:
    """A long-running command in a container. `buildah run` does not forward signals (a SIGTERM to
    it kills its chroot helper and orphans the command), so stopping is done as `docker stop` does
    it: SIGTERM to the container's first process -- the image's entrypoint, tini, which passes it on
    to pixq for a warm shutdown -- then SIGKILL to whatever of the container is left."""

    svc: Service

    def processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.svc.pid).children(recursive=True)
        return []

    def stop(self, timeout_s: float = 30) -> None:
        inside = [p for p in self.processes() if not p.name().startswith("buildah")]
        if inside:
            with contextlib.suppress(psutil.NoSuchProcess):
                inside[0].terminate()
            psutil.wait_procs(inside, timeout=timeout_s)
        for proc in [*inside, *self.processes()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.svc.stop(timeout_s=10)


@pytest.fixture(scope="module")
def worker_box(images: dict[str, Image]) -> Iterator[Container]:
    box = Container(images["worker"])
    yield box
    box.remove()


@pytest.fixture(scope="module")
def light_box(images: dict[str, Image]) -> Iterator[Container]:
    box = Container(images["producer"])
    yield box
    box.remove()


def container_env(redis_url: str, s3: S3Endpoint) -> dict[str, str]:
    """Only the settings the program reads (the container has its own PATH, HOME and so on)."""
    env = stack_env(redis_url, s3, MODEL_IN_IMAGE)
    return {k: v for k, v in env.items() if k.startswith(("PIXQ_", "AWS_")) or k == "OMP_NUM_THREADS"}


@pytest.fixture(scope="module")
def model_dir(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny pipeline, readable by the image's non-root user (pytest's temp folders are 0700)."""
    target = tmp_path_factory.mktemp("image-model") / "tiny"
    shutil.copytree(tiny_model, target)
    for path in [target.parent, target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(target)


def healthy(box: Container) -> bool:
    test = box.image.config["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    return box.run(test[1:], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def image_worker(worker_box: Container, redis_url: str, s3: S3Endpoint, model_dir: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The worker image's ENTRYPOINT with its CMD's worker arguments, told the CPU and the tiny model."""
    image = worker_box.image
    cmd = image.cmd
    ready_file = cmd[cmd.index("--ready-file") + 1]
    assert not healthy(worker_box), "healthy before the worker started"
    argv = [*image.entrypoint, "worker", "--model", MODEL_IN_IMAGE, "--device", "cpu",
            "--ready-file", ready_file, "--name", WORKER_NODE]
    log = tmp_path_factory.mktemp("image-worker") / "worker.log"
    running = worker_box.start("image worker", argv, log, env=container_env(redis_url, s3),
                               volumes={model_dir: MODEL_IN_IMAGE})
    try:
        running.svc.wait_until(lambda: healthy(worker_box), 180)
        yield running
    finally:
        running.stop()


def test_worker_image_runs_as_its_non_root_user(worker_box: Container) -> None:
    done = worker_box.run(["id", "-u"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == worker_box.image.config["User"].split(":")[0] != "0"


def test_worker_image_imports_its_packages_from_bytecode(worker_box: Container) -> None:
    """The image sets PYTHONDONTWRITEBYTECODE, so a module without bytecode is compiled from source at every
    start: on an H200 host whose torch had none, that was 7.5 of a worker's 22.9 s of imports (issue 14,
    docs/performance.md). pip writes the bytecode when it installs; this checks that every installed module a
    worker imports has it."""
    code = ("import importlib.util as u, os, sys\n"
            "import pixq.worker.ops.serve, pixq.worker.jobs.tasks, torch\n"
            "from diffusers import PixArtSigmaPipeline\n"
            "files = [m.__file__ for m in list(sys.modules.values()) if (getattr(m, '__file__', None) or '')"
            ".endswith('.py')]\n"
            "site = [f for f in files if '-packages' in f]\n"
            "missing = [f for f in site if not os.path.exists(u.cache_from_source(f))]\n"
            "stdlib = [f for f in files if f not in site and not os.path.exists(u.cache_from_source(f))]\n"
            "print(len(site), len(missing), len(stdlib), ' '.join(missing[:5]))\n")
    done = worker_box.run(["python", "-c", code], timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    site, missing, stdlib, examples = (done.stdout.strip().splitlines()[-1].split(" ", 3) + [""])[:4]
    print(f"worker image: {site} installed modules imported, {missing} without bytecode; stdlib without: {stdlib}")
    assert int(site) > 1000 and int(missing) == 0, examples


def test_worker_image_builds_a_compiled_set_that_loads(worker_box: Container, model_dir: str) -> None:
    """`pixq compile` as infra/compile-job.yaml runs it, in the worker image: the image's own C++ compiler builds
    the AOT packages, and the fresh-process load check passes with the image's libraries. (Before issue 14's
    run k the image had no compiler, so the compile Job and `--compile` could not have run in it.)"""
    done = worker_box.run(["pixq", "compile", "--model", MODEL_IN_IMAGE, "--device", "cpu", "--out", "/tmp/pixq-sets",
                           "--size", "256x256"], env={"OMP_NUM_THREADS": "2"}, timeout=1500,
                          volumes={model_dir: MODEL_IN_IMAGE})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded the 2 packages in a fresh process" in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip().startswith("/tmp/pixq-sets/pixart-cpu-float32-torch"), done.stdout


def test_light_image_submits_and_the_worker_image_serves_the_job(
    image_worker: Running, light_box: Container, redis_url: str, s3: S3Endpoint, s3_client: Any
) -> None:
    env = container_env(redis_url, s3)
    argv = [*light_box.image.entrypoint, "submit", "a small cactus in the desert", "--steps", "2",
            "--width", "128", "--height", "128", "--seed", "11", "--wait", "--timeout", "120", "--json"]
    done = light_box.run(argv, env=env, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["state"] == JobState.succeeded.value, record
    assert record["worker"].startswith(WORKER_NODE), record["worker"]
    # What the client in the light image reported is what the store holds.
    settings = Settings.from_env(stack_env(redis_url, s3, MODEL_IN_IMAGE))
    client = Client(settings)
    try:
        assert client.status(record["id"]).state is JobState.succeeded
    finally:
        client.close()
    (image,) = record["images"]
    body = s3_client.get_object(Bucket=image["bucket"], Key=image["key"])["Body"].read()
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(body).hexdigest() == image["sha256"]
    assert (image["width"], image["height"]) == (128, 128)


def test_light_image_holds_no_torch_and_no_worker(light_box: Container) -> None:
    code = ("import importlib.util as u\n"
            "for m in ('torch', 'diffusers', 'transformers', 'pixq.worker', 'flower'):\n"
            "    print(m, u.find_spec(m) is not None)\n")
    done = light_box.run(["python", "-c", code])
    assert done.returncode == 0, done.stderr
    found = dict(line.split() for line in done.stdout.splitlines())
    assert found == {"torch": "False", "diffusers": "False", "transformers": "False", "pixq.worker": "False",
                     "flower": "True"}
    listed = light_box.run(["sh", "-c", "find / -xdev -name 'torch*' -path '*-packages*' | head -5"])
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout


def test_light_image_default_command_prints_the_cli_help(light_box: Container) -> None:
    done = light_box.run([*light_box.image.entrypoint, *light_box.image.cmd])
    assert done.returncode == 0, done.stderr
    assert "submit" in done.stdout and "Usage" in done.stdout


def test_light_image_creates_the_bucket_as_compose_s3_init_does(light_box: Container, redis_url: str,
                                                                 s3: S3Endpoint) -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    entrypoint = compose["services"]["s3-init"]["entrypoint"]
    env = {**container_env(redis_url, s3), "PIXQ_S3_BUCKET": f"image-init-{secrets.token_hex(3)}"}
    for expected in ("created", "exists"):
        done = light_box.run(entrypoint, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{env['PIXQ_S3_BUCKET']} {expected}" in done.stdout


def test_light_image_flower_answers_behind_basic_auth_and_sees_the_image_worker(
    light_box: Container, image_worker: Running, redis_url: str, tmp_path: Path
) -> None:
    """Flower as compose runs it: the light image with compose's entrypoint (`celery -A pixq.celeryapp:app
    flower`), settings by environment; the worker answers its remote-control commands (its replies use
    the workers' own broker options: a plain `celery flower` made the worker fail to parse them)."""
    flower = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["flower"]
    port = free_port()
    auth = f"operator:{secrets.token_urlsafe(12)}"
    env = {"PIXQ_REDIS_URL": redis_url, "FLOWER_BASIC_AUTH": auth, "FLOWER_ADDRESS": "127.0.0.1",
           "FLOWER_PORT": str(port)}
    running = light_box.start("image flower", flower["entrypoint"], tmp_path / "flower.log", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        running.svc.wait_until(lambda: http(f"{base}/")[0] == 401, 90)
        # compose's health check, run inside the image as compose runs it (on this test's port).
        check = [part.replace("5555", str(port)) for part in flower["healthcheck"]["test"][1:]]
        assert light_box.run(check, timeout=60).returncode == 0

        def sees_worker() -> bool:
            status, body = http(f"{base}/workers?json=1", auth)
            return status == 200 and WORKER_NODE in {w.get("hostname") for w in json.loads(body)["data"]}

        wait_for(sees_worker, 60, "Flower in the light image to list the worker image's node")
        assert http(f"{base}/workers?json=1", "operator:wrong")[0] == 401

        def worker_answers() -> bool:  # Flower's remote-control inspect: the worker's replies arrive
            status, body = http(f"{base}/api/workers?refresh=1&workername={WORKER_NODE}", auth)
            return status == 200 and WORKER_NODE in json.loads(body)

        wait_for(worker_answers, 60, "the worker image's node to answer Flower's inspect")
        assert "Control command error" not in image_worker.svc.log_path.read_text()
    finally:
        running.stop()


def test_light_image_serves_the_http_api_and_the_worker_image_renders_its_job(
    light_box: Container, image_worker: Running, redis_url: str, s3: S3Endpoint, tmp_path: Path
) -> None:
    """`pixq api` from the light image as compose's `api` service runs it (on this test's loopback port),
    with a key made by the image's `pixq keys create`."""
    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["api"]
    entry = light_box.image.entrypoint
    env = {**container_env(redis_url, s3), "PIXQ_API_KEY_PEPPER": secrets.token_hex(16)}
    made = light_box.run([*entry, "keys", "create", f"image-{secrets.token_hex(3)}", "--scope", "submit,read",
                          "--json"], env=env)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    port = str(free_port())
    command = [{"0.0.0.0": "127.0.0.1", "8000": port}.get(arg, arg) for arg in service["command"]]
    assert command[-4:] == ["--host", "127.0.0.1", "--port", port], command
    running = light_box.start("image api", [*entry, *command], tmp_path / "api.log", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        running.svc.wait_until(lambda: http(f"{base}/readyz")[0] == 200, 90)
        # compose's health check, run inside the image.
        check = [part.replace("8000", port) for part in service["healthcheck"]["test"][1:]]
        assert light_box.run(check, timeout=60).returncode == 0
        assert http(f"{base}/v1/jobs")[0] == 401
        request = {"prompt": "a lighthouse at dusk", "model_name": MODEL_IN_IMAGE, "width": 128, "height": 128,
                   "num_inference_steps": 2, "seed": 5}
        status, body = http(f"{base}/v1/jobs", key, request)
        assert status == 201, body[-500:]
        job_id = json.loads(body)["id"]

        def finished() -> dict[str, Any] | None:
            answer, record = http(f"{base}/v1/jobs/{job_id}", key)
            assert answer == 200, record[-500:]
            parsed: dict[str, Any] = json.loads(record)
            return parsed if JobState(parsed["state"]).is_terminal else None

        record = wait_for(finished, 120, "the API's job to finish on the worker image")
        assert record["state"] == JobState.succeeded.value, record
        assert record["worker"].startswith(WORKER_NODE) and len(record["image_urls"]) == 1
    finally:
        running.stop()


def test_image_sizes_are_recorded(images: dict[str, Image]) -> None:
    sizes = {kind: image.size_bytes for kind, image in images.items()}
    write_artifact("images-sizes.json", json.dumps(sizes).encode())
    print(f"image sizes (MB): { {k: round(v / 1e6) for k, v in sizes.items()} }")
    # The light image is the client's: a fraction of the worker's, which carries torch.
    assert sizes["producer"] < 400e6 and sizes["producer"] * 4 < sizes["worker"], sizes
