"""Relay faults that need the session's Redis to themselves: a relay SIGKILLed mid-delivery (another
relay delivers the event after the delivery's lease), and a receiver that is down for a while.

Their own module: no other relay (the API fixtures' relays, with their short schedules) runs meanwhile.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.apitools import Receiver, api_env, canceled_job, delivery, make_key, start_api, start_relay, verified
from tests.services import pixq_argv, start_redis
from tests.support import wait_for

pytestmark = pytest.mark.slow


def test_relay_killed_mid_delivery_another_delivers(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                                                    slow_model: str) -> None:
    env_hooks = api_env(env)
    logs = tmp_path_factory.mktemp("relays")
    api_svc, base = start_api(env_hooks, logs / "api.log", "--no-relay")
    first = start_relay(env_hooks, logs / "relay-1.log")
    second = None
    receiver = Receiver(plan=lambda n: (200, 30.0, {}) if n == 0 else 200)  # the first attempt hangs
    try:
        key = make_key(env_hooks, "relay-kill")
        job_id = canceled_job(base, key, receiver.url, slow_model)
        receiver.wait(lambda h: len(h) == 1, 30, "the first attempt")
        first.signal(signal.SIGKILL)
        second = start_relay(env_hooks, logs / "relay-2.log")
        hits = receiver.wait(lambda h: len(h) >= 2, 60, "the other relay's attempt (after the lease)")
        for hit in hits:
            verified(hit, key, job_id)
    finally:
        receiver.close()
        for svc in (first, second, api_svc):
            if svc is not None:
                svc.stop()


def test_receiver_down_for_a_while_then_up(env: dict[str, str], slow_model: str,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.services import free_port

    # Its own API: attempts every second for 30 s, so the delivery outlasts the receiver's absence.
    env = api_env(env, PIXQ_WEBHOOK_SCHEDULE_S=",".join(["1"] * 30))
    svc, base = start_api(env, tmp_path_factory.mktemp("down") / "api.log")
    port = free_port()
    receiver = None
    try:
        key = make_key(env, "down-then-up")
        job_id = canceled_job(base, key, f"http://127.0.0.1:{port}/hook", slow_model)
        time.sleep(5)  # nothing listens: connections refused, attempts scheduled
        d = delivery(base, key, job_id)
        assert d["state"] == "pending" and int(str(d["attempts"])) >= 2 and "ConnectError" in str(d["last_error"])
        receiver = Receiver(port=port)
        hits = receiver.wait(lambda h: len(h) >= 1, 30, "the delivery once the receiver is up")
        verified(hits[0], key, job_id)
    finally:
        if receiver is not None:
            receiver.close()
        svc.stop()


# -- webhook secrets sealed at rest (issue 23, item 7): a real API, relays and `pixq keys` over a Redis of their
# own (re-sealing walks every key), each given PIXQ_SECRETS_KEY.

def secrets_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture()
def sealed_env(env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    svc, url = start_redis(tmp_path / "redis")
    yield api_env(env, PIXQ_REDIS_URL=url, PIXQ_SECRETS_KEY=secrets_key())
    svc.stop()


def pixq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pixq_argv(*args), env=env, capture_output=True, text=True, timeout=60)


def stored_secrets(env: dict[str, str], key: dict[str, str]) -> bytes:
    with redis.Redis.from_url(env["PIXQ_REDIS_URL"]) as conn:
        return conn.hget(f"pixq:apikey:{key['id']}", "webhook_secrets") or b""  # type: ignore[return-value]


def test_a_sealed_secret_signs_real_deliveries_and_a_wrong_key_is_named(
        sealed_env: dict[str, str], tmp_path: Path, slow_model: str) -> None:
    api_svc, base = start_api(sealed_env, tmp_path / "api.log", "--no-relay")
    relay = start_relay(sealed_env, tmp_path / "relay.log")
    receiver = Receiver()
    try:
        key = make_key(sealed_env, "sealed")
        raw = stored_secrets(sealed_env, key)
        assert raw.startswith(b"pixq-sealed:v1:") and key["webhook_secret"].removeprefix("whsec_").encode() not in raw
        job_id = canceled_job(base, key, receiver.url, slow_model)
        verified(receiver.wait(lambda h: len(h) == 1, 30, "the delivery")[0], key, job_id)  # standardwebhooks

        # A relay given another key signs nothing and says which key the secret needs.
        relay.stop()
        wrong = {**sealed_env, "PIXQ_SECRETS_KEY": secrets_key()}
        relay = start_relay(wrong, tmp_path / "relay-wrong.log")
        job_id = canceled_job(base, key, receiver.url, slow_model)
        wait_for(lambda: "PIXQ_SECRETS_KEY does not hold" in str(delivery(base, key, job_id)["last_error"]), 30,
                 "the delivery's error to name the missing key")
        assert len(receiver.hits) == 1
        out = pixq(wrong, "keys", "rotate-encryption")
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "key sealed: " in out.stderr and "PIXQ_SECRETS_KEY does not hold" in out.stderr
        assert sealed_env["PIXQ_SECRETS_KEY"] not in out.stderr + out.stdout
    finally:
        receiver.close()
        relay.stop()
        api_svc.stop()


def test_rotating_the_encryption_key_and_secrets_stored_in_the_clear(
        sealed_env: dict[str, str], tmp_path: Path, slow_model: str) -> None:
    old = sealed_env["PIXQ_SECRETS_KEY"]
    api_svc, base = start_api(sealed_env, tmp_path / "api.log", "--no-relay")
    receiver = Receiver()
    relay = None
    try:
        key = make_key(sealed_env, "rotated")
        legacy = make_key(sealed_env, "from-before")
        with redis.Redis.from_url(sealed_env["PIXQ_REDIS_URL"]) as conn:  # as versions before sealing stored it
            conn.hset(f"pixq:apikey:{legacy['id']}", "webhook_secrets", json.dumps([legacy["webhook_secret"]]))
        new = secrets_key()
        rotating = {**sealed_env, "PIXQ_SECRETS_KEY": f"{new},{old}"}  # the new key first, the old one after it
        out = pixq(rotating, "keys", "rotate-encryption")
        assert out.returncode == 0 and "2 of 2 keys' webhook secrets re-sealed" in out.stdout, out.stderr
        assert "(1 were in the clear)" in out.stdout
        assert legacy["webhook_secret"].encode() not in stored_secrets(sealed_env, legacy)

        relay = start_relay({**sealed_env, "PIXQ_SECRETS_KEY": new}, tmp_path / "relay.log")  # the old key dropped
        for n, k in enumerate((key, legacy), 1):
            job_id = canceled_job(base, k, receiver.url, slow_model)
            hits = receiver.wait(lambda h: len(h) >= n, 30, "the delivery")  # noqa: B023 - waited on at once
            verified(hits[n - 1], k, job_id)

        # A relay seals, at its start, what an earlier version stored in the clear.
        relay.stop()
        with redis.Redis.from_url(sealed_env["PIXQ_REDIS_URL"]) as conn:
            conn.hset(f"pixq:apikey:{legacy['id']}", "webhook_secrets", json.dumps([legacy["webhook_secret"]]))
        relay = start_relay({**sealed_env, "PIXQ_SECRETS_KEY": new}, tmp_path / "relay-2.log")
        wait_for(lambda: stored_secrets(sealed_env, legacy).startswith(b"pixq-sealed:v1:"), 30,
                 "the relay to seal the secret stored in the clear")
    finally:
        receiver.close()
        if relay is not None:
            relay.stop()
        api_svc.stop()
