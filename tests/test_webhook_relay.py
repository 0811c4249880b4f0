"""Relay faults that need the session's Redis to themselves: a relay SIGKILLed mid-delivery (another
relay delivers the event after the delivery's lease), and a receiver that is down for a while.

Their own module: no other relay (the API fixtures' relays, with their short schedules) runs meanwhile.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.apitools import Receiver, api_env, make_key, start_api, start_relay
from tests.test_webhooks import canceled_job, delivery, verified

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
    from pixq.worker.ops.stack import free_port

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
        assert d["state"] == "pending" and int(d["attempts"]) >= 2 and "ConnectError" in str(d["last_error"])
        receiver = Receiver(port=port)
        hits = receiver.wait(lambda h: len(h) >= 1, 30, "the delivery once the receiver is up")
        verified(hits[0], key, job_id)
    finally:
        if receiver is not None:
            receiver.close()
        svc.stop()
