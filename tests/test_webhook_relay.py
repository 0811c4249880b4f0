"""A relay SIGKILLed mid-delivery: another relay delivers the event after the delivery's lease.

Its own module: no other relay (the API fixtures' relays) runs on the session's Redis meanwhile.
"""

from __future__ import annotations

import signal

import pytest

from tests.apitools import Receiver, api_env, make_key, start_api, start_relay
from tests.test_webhooks import canceled_job, verified

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
