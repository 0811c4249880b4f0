"""The webhook relay: outbox stream -> deliveries -> signed POSTs, retried on a schedule.

Reads ``records.OUTBOX_KEY`` with a consumer group; an entry read by a relay that died before
taking it is claimed by another (``XAUTOCLAIM``). Each entry becomes one delivery (see
``deliveries.py``), sent per the Standard Webhooks spec with the ``standardwebhooks`` package:
2xx is the only success, ``410 Gone`` stops sending to that URL, anything else (3xx included:
redirects are not followed) retries after the schedule's next wait with jitter, or the
receiver's ``Retry-After``. At least once, in order per job; receivers dedupe on ``webhook-id``.
A key's signing secrets are sealed in Redis (``keys.py``); the relay opens them per attempt, and at
its start seals any an earlier version stored in the clear.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import redis
from standardwebhooks.webhooks import Webhook

from pixq.api.config import ApiSettings
from pixq.api.deliveries import GROUP, Delivery, DeliveryStore, payload_json
from pixq.api.keys import KeyStore
from pixq.api.secretbox import SecretsKeyError
from pixq.egress import EgressRefused, check_destination
from pixq.records import OUTBOX_KEY, decode_record
from pixq.settings import Settings

log = logging.getLogger(__name__)
CLAIM_IDLE_MS = 30_000  # an outbox entry read this long ago and never acked is taken over
CLAIM_EVERY_S = 5.0
MAX_RETRY_AFTER_S = 24 * 3600
ERROR_CHARS = 300


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (a number or an HTTP date), or ``None``."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


class Relay:
    """One relay (run several: they share the work). ``start`` runs it on a thread."""

    def __init__(self, settings: Settings, api: ApiSettings, conn: redis.Redis, public_url: str,
                 name: str | None = None):
        self.settings, self.api, self.conn = settings, api, conn
        self.store = DeliveryStore(conn)
        self.keys = KeyStore(conn, api.require_pepper(), api.secrets_keys)
        self.public_url = public_url.rstrip("/")
        self.name = name or f"{socket.gethostname()}-{threading.get_native_id()}-{random.getrandbits(24):06x}"
        self.allow = settings.webhook_allow_networks()
        self.http = httpx.Client(timeout=api.webhook_timeout_s, follow_redirects=False,
                                 headers={"user-agent": "pixart-queue-webhooks/1"})
        self.pool = ThreadPoolExecutor(max_workers=api.webhook_concurrency, thread_name_prefix="pixq-webhook")
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outcomes: Any = None  # a prometheus Counter with an "outcome" label, when the API gives one

    # -- running --------------------------------------------------------------------------------

    def start(self, outcomes: Any = None) -> None:
        self.outcomes = outcomes
        self._thread = threading.Thread(target=self.run, name="pixq-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    def run(self) -> None:
        next_claim = 0.0
        self._seal_plaintext_secrets()
        while not self._stop.is_set():
            try:
                self._ensure_group()
                if time.monotonic() >= next_claim:
                    self._autoclaim()
                    next_claim = time.monotonic() + CLAIM_EVERY_S
                self._read(block_ms=200)
                self._dispatch()
            except redis.RedisError as exc:
                log.warning("relay %s: Redis unavailable (%s); retrying", self.name, exc)
                self._stop.wait(1.0)

    def _seal_plaintext_secrets(self) -> None:
        """Seal the signing secrets an earlier version stored in the clear (once, at start; every relay may:
        each write is conditional). Secrets sealed with another key are left to `pixq keys rotate-encryption`."""
        try:
            done = self.keys.reseal_all(plaintext_only=True)
        except redis.RedisError as exc:
            log.warning("relay %s: webhook secrets stored in the clear were not sealed: %s", self.name, exc)
            return
        if done.resealed:
            log.warning("relay %s: sealed the webhook secrets of %d API keys stored in the clear by an earlier "
                        "version (Redis's AOF/RDB files may still hold them until rewritten)", self.name,
                        done.resealed)

    def _ensure_group(self) -> None:
        try:
            self.conn.xgroup_create(OUTBOX_KEY, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _autoclaim(self) -> None:
        start = "0-0"
        while True:
            reply: Any = self.conn.xautoclaim(OUTBOX_KEY, GROUP, self.name, CLAIM_IDLE_MS, start, count=100)
            start, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                self._ingest(entry_id, fields)
            if not entries or start in (b"0-0", "0-0"):
                return

    def _read(self, block_ms: int) -> None:
        reply: Any = self.conn.xreadgroup(GROUP, self.name, {OUTBOX_KEY: ">"}, count=100, block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._ingest(entry_id, fields)

    def _ingest(self, entry_id: Any, fields: Any) -> None:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        event = fields.pop(b"event", b"").decode()
        record = decode_record(fields)
        data = record.to_json_dict()
        data.pop("owner", None)
        data["image_urls"] = [f"{self.public_url}/v1/jobs/{record.id}/images/{i.index}" for i in record.images]
        hook = record.request.webhook
        if hook is None:  # cannot happen: the script adds only jobs with a webhook
            self.conn.xack(OUTBOX_KEY, GROUP, entry)
            return
        self.store.ingest(entry, record.id, event, hook.url, record.owner or "",
                          payload_json(event, data, time.time()))

    def _dispatch(self) -> None:
        with self._busy_lock:
            free = self.api.webhook_concurrency - self._busy
        if free <= 0:
            return
        lease_s = 2 * self.api.webhook_timeout_s + 10
        for delivery in self.store.take(lease_s, free):
            with self._busy_lock:
                self._busy += 1
            self.pool.submit(self._deliver_counted, delivery)

    def _deliver_counted(self, delivery: Delivery) -> None:
        try:
            outcome = self.deliver(delivery)
            if self.outcomes is not None:
                self.outcomes.labels(outcome).inc()
        except Exception:  # a bug must not kill the pool; the lease hands the delivery on
            log.exception("relay %s: delivery %s", self.name, delivery.id)
        finally:
            with self._busy_lock:
                self._busy -= 1

    # -- one attempt ----------------------------------------------------------------------------

    def secrets_for(self, delivery: Delivery) -> tuple[str, ...]:
        key = self.keys.get(delivery.owner) if delivery.owner else None
        opened = self.keys.webhook_secrets(key) if key is not None else ()
        if opened:
            return opened
        return (self.api.webhook_secret,) if self.api.webhook_secret else ()

    def deliver(self, delivery: Delivery) -> str:
        """Attempt one delivery and record what happened: delivered, retry, failed or gone."""
        now = time.time()
        attempt = {"attempts": delivery.attempts + 1, "last_attempt_at": now}
        if self.store.is_gone(delivery.url):
            self.store.finish(delivery, "gone", last_error="the URL answered 410 Gone to an earlier delivery")
            return "gone"
        status: int | None = None
        retry_after: float | None = None
        try:
            check_destination(delivery.url, self.allow)
            secrets = self.secrets_for(delivery)
            if not secrets:
                raise EgressRefused("no signing secret (the job's API key is gone and PIXQ_WEBHOOK_SECRET is unset)")
            stamp = datetime.fromtimestamp(now, tz=timezone.utc)
            signature = " ".join(Webhook(s).sign(delivery.id, stamp, delivery.payload) for s in secrets)
            response = self.http.post(delivery.url, content=delivery.payload.encode(), headers={
                "content-type": "application/json", "webhook-id": delivery.id,
                "webhook-timestamp": str(int(now)), "webhook-signature": signature,
            })
            status = response.status_code
            if 200 <= status < 300:
                self.store.finish(delivery, "delivered", **attempt, last_status=status, last_error="",
                                  delivered_at=time.time())
                return "delivered"
            if status == 410:
                self.store.finish(delivery, "gone", **attempt, last_status=status, last_error="410 Gone")
                return "gone"
            error = f"answered {status}"
            retry_after = retry_after_s(response.headers.get("retry-after"))
        except SecretsKeyError as exc:  # PIXQ_SECRETS_KEY lacks the key: retried, in case the operator adds it
            error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
            log.warning("webhook %s not signed: %s", delivery.id, exc)
        except (httpx.HTTPError, EgressRefused) as exc:
            error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
        schedule = self.api.webhook_schedule_s
        if delivery.attempts >= len(schedule):
            self.store.finish(delivery, "failed", **attempt, last_status=status, last_error=error)
            log.warning("webhook %s exhausted after %d attempts: %s", delivery.id, attempt["attempts"], error)
            return "failed"
        wait_s = schedule[delivery.attempts] * random.uniform(0.8, 1.2)
        if retry_after is not None:
            wait_s = retry_after
        self.store.finish(delivery, "retry", next_at=time.time() + wait_s, **attempt, last_status=status,
                          last_error=error)
        return "retry"
