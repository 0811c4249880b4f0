"""One identity per worker process (issue 15): default names carry the pid, a live holder's name is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import redis
from pixq.errors import WorkerNameTaken
from pixq.wire import WORKER_KEY_PREFIX
from pixq.worker.ops.identity import Presence, check_name_free, claim_name, default_name
from pixq.worker.ops.options import WorkerOptions

from tests.services import Service, pixq_argv
from tests.support import wait_for


def test_default_names_differ_per_process() -> None:
    host = socket.gethostname()
    assert WorkerOptions(model="m").node_name() == f"cpu-{os.getpid()}@{host}"
    assert default_name("cuda:1", pid=7, host="h") == "gpu1-7@h"
    assert default_name("cpu", pid=7, host="h") != default_name("cpu", pid=8, host="h")
    assert WorkerOptions(model="m", name="mine@x").node_name() == "mine@x"


def test_a_live_holder_is_refused_and_a_dead_one_on_this_host_taken_over(raw_redis: redis.Redis) -> None:
    name = f"ident-{os.getpid()}@test"
    key = WORKER_KEY_PREFIX + name
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    try:
        # Another host's holder: only its TTL says it is dead.
        raw_redis.set(key, json.dumps({"pid": 1, "host": "elsewhere"}), ex=15)
        with pytest.raises(WorkerNameTaken, match=f"worker name '{name}' is held by a live worker"):
            check_name_free(raw_redis, name)
        with pytest.raises(WorkerNameTaken):
            claim_name(raw_redis, name, {"pid": os.getpid(), "host": socket.gethostname()})
        # This host, process gone (a crashed worker restarted within the TTL): taken over.
        raw_redis.set(key, json.dumps({"pid": gone_pid.pid, "host": socket.gethostname()}), ex=15)
        check_name_free(raw_redis, name)
        claim_name(raw_redis, name, {"pid": os.getpid(), "host": socket.gethostname()})
        assert json.loads(raw_redis.get(key) or "{}")["pid"] == os.getpid()
    finally:
        raw_redis.delete(key)


@pytest.mark.slow
def test_the_claimed_name_beats_from_the_claim_and_says_serving_only_when_told(raw_redis: redis.Redis) -> None:
    name = f"beat-{os.getpid()}@test"
    key = WORKER_KEY_PREFIX + name
    info = {"name": name, "pid": os.getpid(), "host": socket.gethostname()}
    claim_name(raw_redis, name, {**info, "serving": False})
    presence = Presence(raw_redis, name, info)
    try:
        raw_redis.expire(key, 1)  # as if the consumer took longer than the TTL to start
        presence.start()  # the first beat renews it at once
        wait_for(lambda: raw_redis.ttl(key) > 1, 5, "the first beat")
        assert json.loads(raw_redis.get(key) or "{}")["serving"] is False
        presence.serving()
        assert json.loads(raw_redis.get(key) or "{}") == {**info, "serving": True}
        # A worker whose store refuses writes pauses, and its record says why until it serves again.
        presence.paused("storage unavailable: NoSuchBucket")
        assert json.loads(raw_redis.get(key) or "{}") == {**info, "serving": False,
                                                          "paused": "storage unavailable: NoSuchBucket"}
        presence.serving()
        assert json.loads(raw_redis.get(key) or "{}") == {**info, "serving": True}
    finally:
        presence.stop()
    assert raw_redis.get(key) is None  # given back at once


def test_a_second_worker_with_a_live_workers_name_refuses_to_start(
        env: dict[str, str], worker: Service, tiny_model: str) -> None:
    # conftest's session worker holds cpu-main@test
    taken = subprocess.run(pixq_argv("worker", "--model", tiny_model, "--name", "cpu-main@test"),
                           env=env, capture_output=True, text=True, timeout=120)
    assert taken.returncode == WorkerNameTaken.exit_code, taken.stderr
    errors = [line for line in taken.stderr.splitlines() if line.startswith("error:")]  # the rest: log lines
    assert len(errors) == 1 and "worker name 'cpu-main@test' is held by a live worker" in errors[0], taken.stderr
    assert f"pid {worker.pid}" in errors[0] and "Traceback" not in taken.stderr
    assert worker.alive()


def test_the_start_runs_without_cyclic_gc_and_serving_resumes_it_with_the_start_frozen() -> None:
    """``pixq worker`` turns the collector off before its imports; ``resume_gc`` (run when Celery is ready) turns
    it on again, with what the start made in the permanent generation, which later collections skip."""
    import gc

    from pixq.worker.ops.serve import resume_gc

    gc.disable()
    try:
        made = [[object()] for _ in range(1000)]  # what a start makes: long-lived, tracked objects
        resume_gc()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()
        gc.enable()
