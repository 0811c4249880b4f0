"""Every command against services that are down or refuse us: one line on stderr, a defined exit code,
no traceback (real redis-server and SeaweedFS from the fixtures; a closed port is a free port nobody
listens on)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pixq.client import Client
from pixq.errors import BrokerUnavailable, ConfigError, NoWorkerWarning, StorageUnavailable, service_error
from pixq.records import ImageRecord, JobState, RecordStore
from pixq.schema import parse_request
from pixq.settings import Settings

from tests.services import S3Endpoint, free_port
from tests.support import wait_for

# Runs several pixq command lines in one interpreter (a process each would cost a second apiece
# here), each through pixq.cli.run as the console script runs it; prints one JSON result per line.
_DRIVER = """
import contextlib, io, json, sys
from pixq.cli import run
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv)
        except BaseException as exc:  # what would have been a traceback
            code, err = -1, io.StringIO(f"Traceback: {type(exc).__name__}: {exc}")
    print(json.dumps({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
"""


def run_all(commands: list[list[str]], env: dict[str, str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def assert_one_line(result: dict, code: int, words: str) -> None:
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == code, result
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result
    assert "Traceback" not in result["stderr"]


def every_command(job_id: str, out_dir: Path) -> list[list[str]]:
    return [["submit", "a lighthouse"], ["status", job_id], ["wait", job_id, "--timeout", "1"], ["cancel", job_id],
            ["dead"], ["retry", job_id], ["queue"], ["download", job_id, "-o", str(out_dir)], ["url", job_id]]


@pytest.fixture()
def finished_job(settings: Settings, raw_redis: redis.Redis) -> Iterator[str]:
    """A succeeded job's record with one image that is not in S3 (no worker needed)."""
    records = RecordStore(raw_redis, 600)
    job_id = uuid.uuid4().hex
    request = parse_request({"prompt": "x", "model_name": settings.model, "seed": 1})
    records.create(job_id, request)
    image = ImageRecord(index=0, bucket=settings.s3_bucket or "", key=f"jobs/{job_id}/0.png", width=64, height=64,
                        seed=1, content_type="image/png", size_bytes=3, sha256="0" * 64)
    records.transition(job_id, None, state=JobState.succeeded, images=[image], finished_at=time.time())
    yield job_id
    records.delete(job_id)


@pytest.mark.slow  # nine commands, each riding out its retry budget against the closed port: 6-7 s of waiting
def test_every_command_with_redis_on_a_closed_port(env: dict[str, str], tmp_path: Path) -> None:
    closed = {**env, "PIXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    commands = every_command("0" * 32, tmp_path)
    results = run_all(commands, closed)
    assert [r["argv"] for r in results] == commands
    for result in results:
        assert_one_line(result, BrokerUnavailable.exit_code, "Redis unreachable")
    assert "job not submitted" in results[0]["stderr"]


def test_every_command_with_a_wrong_redis_password(env: dict[str, str], tmp_path: Path) -> None:
    wrong = env["PIXQ_REDIS_URL"].replace("test-redis-password-5d1e", "not-the-password")
    assert wrong != env["PIXQ_REDIS_URL"]
    for result in run_all(every_command("0" * 32, tmp_path), {**env, "PIXQ_REDIS_URL": wrong}):
        assert_one_line(result, BrokerUnavailable.exit_code, "Redis refused the login")
        assert "not-the-password" not in result["stderr"]  # the message never repeats a secret


def test_redis_database_past_the_servers_last_is_a_config_error(env: dict[str, str], tmp_path: Path) -> None:
    url = env["PIXQ_REDIS_URL"].rsplit("/", 1)[0] + "/99"
    for result in run_all([["status", "0" * 32], ["queue"]], {**env, "PIXQ_REDIS_URL": url}):
        assert_one_line(result, ConfigError.exit_code, "PIXQ_REDIS_URL")


@pytest.mark.slow  # a dozen CLI runs against broken S3 endpoints
def test_storage_failures_of_download_and_url(env: dict[str, str], s3: S3Endpoint, finished_job: str,
                                              tmp_path: Path) -> None:
    closed = {**env, "PIXQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    download = ["download", finished_job, "-o", str(tmp_path / "got")]
    results = {r["argv"][0]: r for r in run_all(every_command(finished_job, tmp_path / "got"), closed)}
    assert_one_line(results["download"], StorageUnavailable.exit_code, "S3 unreachable")
    url = results["url"]
    assert url["code"] == 0 and url["stdout"].startswith("http://127.0.0.1:")  # presigning needs no round trip
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url["stdout"]
    # The commands that do not touch S3 work as ever (retry: a succeeded job is not retried, one line).
    assert {name: r["code"] for name, r in results.items()} == {
        "submit": 0, "status": 0, "wait": 0, "cancel": 0, "dead": 0, "retry": 3, "queue": 0, "download": 8, "url": 0}
    assert all("Traceback" not in r["stderr"] for r in results.values())
    run_all([["cancel", results["submit"]["stdout"].strip()]], env)

    (wrong_secret,) = run_all([download], {**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert_one_line(wrong_secret, StorageUnavailable.exit_code, "S3 refused the credentials")
    assert "wrong" not in wrong_secret["stderr"].replace("refused", "")

    (missing,) = run_all([download], env)  # the record says succeeded; the object is not there
    assert_one_line(missing, StorageUnavailable.exit_code, "not found")

    no_credentials = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    no_credentials.update({"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE":
                           str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"})
    for result in run_all([download, ["url", finished_job]], no_credentials):
        assert_one_line(result, StorageUnavailable.exit_code, "no credentials")

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (to_file,) = run_all([["download", finished_job, "-o", str(a_file)]], env)
    assert_one_line(to_file, 2, "is a file, not a directory")
    assert not list(tmp_path.glob("got/*"))  # nothing half-written


def test_url_index_is_checked_and_names_the_option(env: dict[str, str], finished_job: str) -> None:
    negative, past, fine = run_all([["url", finished_job, "--index", "-1"], ["url", finished_job, "--index", "1"],
                                    ["url", finished_job, "--index", "0"]], env)
    assert_one_line(negative, 2, "'--index'")
    assert_one_line(past, 2, "'--index': must be 0 to 0")
    assert fine["code"] == 0


@pytest.mark.slow  # kombu's publish retries against the closed port: ~6 s of waiting, at any load
def test_kombu_failure_after_the_record_is_written_leaves_nothing(settings: Settings,
                                                                  raw_redis: redis.Redis) -> None:
    """Records on a live Redis, the broker on a closed port: kombu's OperationalError comes after the
    record was written; the record is undone and the caller gets BrokerUnavailable."""
    closed = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = Client(closed, conn=redis.Redis.from_url(settings.redis_url or ""))
    before = set(raw_redis.scan_iter("pixq:job:*"))
    key = uuid.uuid4().hex
    try:
        with pytest.raises(BrokerUnavailable, match="Redis unreachable.*job not submitted") as caught:
            client.submit("after the record", idempotency_key=key)
    finally:
        client.close()
    assert type(caught.value.__cause__).__module__.startswith("kombu")  # it was kombu's error, mapped
    assert set(raw_redis.scan_iter("pixq:job:*")) == before
    assert not raw_redis.exists(f"pixq:idem:{key}")


def test_an_unknown_exception_is_not_mapped() -> None:
    assert service_error(ValueError("a bug")) is None  # main() lets it through: a bug's traceback is its report


def test_submit_refuses_extra_positional_arguments(client: Client) -> None:
    with pytest.raises(TypeError, match="only positional argument"):
        client.submit("x", "y")  # type: ignore[misc]
    with pytest.raises(TypeError, match="prompt twice"):
        client.submit("x", prompt="y")


def test_submit_warns_when_no_worker_serves_the_model(client: Client, worker: object, tiny_model: str) -> None:
    nobody = "/models/nobody-serves-this"
    with pytest.warns(NoWorkerWarning, match=f"no live worker serves {nobody}") as caught:
        job = client.submit("x", model_name=nobody, num_inference_steps=1)
    assert len(caught) == 1 and job.warning is not None and job.id in job.warning
    client.cancel(job.id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoWorkerWarning)
        served = client.submit("x", model_name=tiny_model, num_inference_steps=1, width=64, height=64)
    assert served.warning is None
    client.cancel(served.id)


def test_cli_submit_warns_on_stderr_and_still_queues(env: dict[str, str]) -> None:
    (result,) = run_all([["submit", "x", "--model", "/models/nobody-serves-this", "--steps", "1"]], env)
    assert result["code"] == 0 and len(result["stdout"].strip()) == 32  # the id: the job is queued
    assert result["stderr"].strip().startswith("warning: no live worker serves /models/nobody-serves-this")
    job_id = result["stdout"].strip()
    (canceled,) = run_all([["cancel", job_id]], env)
    assert canceled["code"] == 0


def test_presigned_urls_are_sigv4_in_us_east_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore presigns SigV2 for us-east-1 unless told otherwise; S3 refuses that for SSE-KMS objects."""
    from pixq.s3 import make_s3_client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    s3 = make_s3_client(Settings(aws_region="us-east-1"))  # AWS itself: no endpoint URL
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k.png"}, ExpiresIn=60)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "us-east-1" in url
    assert "Signature=" not in url.replace("X-Amz-Signature=", "")  # no SigV2 query signature


def test_readme_lists_each_errors_exit_code() -> None:
    """The README's exit-code table and the classes say the same."""
    import re

    import pixq.errors

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| ([^|]*) \|$", readme, re.M)
    named = {name: int(code) for code, cell in rows for name in re.findall(r"`(\w+)`", cell)}
    classes = {name: cls for name, cls in vars(pixq.errors).items()
               if isinstance(cls, type) and issubclass(cls, pixq.errors.PixqError)}
    assert set(classes) - {"PixqError"} <= set(named), set(classes) - set(named)
    for name, code in named.items():
        if name in classes:
            assert classes[name].exit_code == code, name


def test_a_submit_whose_reply_is_lost_while_redis_stays_away_says_its_outcome_is_unknown(
    tmp_path: Path, tiny_model: str
) -> None:
    """Redis stops answering (SIGSTOP) after the create script was sent: no reply, and the undo cannot
    run either. The caller must not hear "not submitted" (the create may land): it gets the job id."""
    import signal

    from pixq.errors import OutcomeUnknown
    from pixq.redisconn import RedisEndpoint

    from tests.services import start_redis

    redis_svc, url = start_redis(tmp_path / "redis")
    settings = Settings.from_env({"PIXQ_REDIS_URL": url, "PIXQ_MODEL": tiny_model})
    conn = RedisEndpoint.parse(url).client(retries=1, socket_timeout_s=0.5, connect_timeout_s=0.5)
    client = Client(settings, conn=conn)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoWorkerWarning)
            client.submit("the message template is built now", idempotency_key="warm")
            redis_svc.signal(signal.SIGSTOP)
            try:
                with pytest.raises(OutcomeUnknown, match="outcome is unknown: job [0-9a-f]{32} may be") as caught:
                    client.submit("sent, then no reply")
            finally:
                redis_svc.signal(signal.SIGCONT)
        assert "not submitted" not in str(caught.value)
        assert "an idempotency key makes a repeated submit safe" in str(caught.value)
        assert caught.value.exit_code == BrokerUnavailable.exit_code
        job_id = str(caught.value).split("job ")[1].split()[0]
        # Once Redis answers again the job is there (the create ran before the undo) or not (the undo
        # ran after it); the id names it either way, and a record that is there is whole.
        with redis.Redis.from_url(url) as check:
            wait_for(lambda: check.ping(), 10, "Redis to answer again")
            if check.exists(RecordStore.key(job_id)):
                assert client.status(job_id).state is JobState.queued
    finally:
        client.close()
        redis_svc.stop()
