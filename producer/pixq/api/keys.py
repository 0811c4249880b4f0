"""API keys: created with a name, scopes and quotas; only an HMAC of the key is stored.

A key reads ``pixq_<id>_<secret>``: the id finds the record, the HMAC-SHA256 of the whole key under
the operator's pepper (``PIXQ_API_KEY_PEPPER``) is compared in constant time. Each key carries its
webhook signing secrets (``whsec_...``, newest first; two during a rotation), sealed with
``secretbox.SecretBox`` (AES-256-GCM, the key from the environment): Redis holds no secret in the clear.
Secrets stored in the clear by earlier versions (a JSON list) are read, and sealed by ``reseal_all``
(``pixq keys rotate-encryption``, and each relay at its start).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import redis

from pixq.api.secretbox import SecretBox, SecretsKeyError
from pixq.errors import PixqError

KEY_PREFIX = "pixq:apikey:"  # HASH per key id
NAMES_KEY = "pixq:apikeys"  # HASH name -> key id
_KEY_RE = re.compile(r"^pixq_([0-9a-f]{16})_[A-Za-z0-9_-]{20,}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": "second", "sec": "second", "second": "second", "m": "minute", "min": "minute",
               "minute": "minute", "h": "hour", "hour": "hour"}
MAX_SECRETS = 2
SECRETS_FIELD = "webhook_secrets"

# KEYS: the key's hash. ARGV: the field, the value read, the value to write. Written only if unchanged
# meanwhile (a rotation of the secret in between wins).
_SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class Scope(str, enum.Enum):
    submit = "submit"  # create and cancel jobs, redeliver their webhooks
    read = "read"  # read jobs, events, images, queues
    admin = "admin"  # everything, on every key's jobs


class KeyCommandError(PixqError):
    """A key command was given a bad name, scope or rate; or the key does not exist."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[Scope]
    max_in_flight: int = 0  # 0: no quota
    rate: str | None = None  # e.g. "10/second" (the ``limits`` library's notation)
    created_at: float = 0.0
    revoked_at: float | None = None
    # The signing secrets in the clear: only on the key ``create`` and ``rotate_webhook_secret`` return (a
    # key read from Redis has them sealed; ``KeyStore.webhook_secrets`` opens them).
    webhook_secrets: tuple[str, ...] = field(default_factory=tuple)
    sealed_secrets: str = field(default="", repr=False)  # as stored: sealed, or a clear JSON list from before

    def allows(self, scope: Scope) -> bool:
        return Scope.admin in self.scopes or scope in self.scopes

    def public(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "scopes": sorted(s.value for s in self.scopes),
                "max_in_flight": self.max_in_flight, "rate": self.rate, "created_at": self.created_at,
                "revoked_at": self.revoked_at}


def parse_scopes(raw: str) -> frozenset[Scope]:
    try:
        scopes = frozenset(Scope(part.strip()) for part in raw.split(",") if part.strip())
    except ValueError:
        raise KeyCommandError(f"--scope: {raw!r}: use submit, read and/or admin, comma-separated") from None
    if not scopes:
        raise KeyCommandError("--scope: name at least one of submit, read, admin")
    return scopes


def parse_rate(raw: str) -> str:
    """``10/s``, ``600/min``, ``5/h`` -> the ``limits`` notation ``10/second``."""
    match = _RATE_RE.match(raw)
    if not match or float(match.group(1)) <= 0 or not float(match.group(1)).is_integer():
        raise KeyCommandError(f"--rate: {raw!r}: use a whole number per s, min or h (e.g. 10/s)")
    return f"{int(float(match.group(1)))}/{_RATE_UNITS[match.group(2)]}"


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class Resealed:
    """What ``KeyStore.reseal_all`` did: keys looked at, re-sealed (of which were in the clear), the sealing
    key's id, and why each key it could not open was left as it was (by key name)."""

    total: int
    resealed: int
    plaintext: int
    kid: str
    refused: dict[str, str] = field(default_factory=dict)


class KeyStore:
    """Keys in Redis. ``secrets_keys``: ``PIXQ_SECRETS_KEY``'s entries (the first seals webhook secrets);
    the key derived from the pepper always opens too, and seals when none is given."""

    def __init__(self, conn: redis.Redis, pepper: str, secrets_keys: Sequence[str] = ()):
        self.conn = conn
        self._pepper = pepper.encode()
        self.box = SecretBox.for_settings(secrets_keys, pepper)
        self._swap = conn.register_script(_SWAP)

    def digest(self, key: str) -> str:
        """What is stored of a key: its HMAC-SHA256 under the pepper, in hex."""
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    def create(self, name: str, scopes: frozenset[Scope], max_in_flight: int = 0,
               rate: str | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the key text (shown once, never stored)."""
        if not _NAME_RE.match(name):
            raise KeyCommandError(f"NAME: {name!r}: 1-64 letters, digits, '.', '_', '-'")
        if max_in_flight < 0:
            raise KeyCommandError("--max-in-flight: must be 0 (no quota) or more")
        key_id = secrets.token_hex(8)
        text = f"pixq_{key_id}_{secrets.token_urlsafe(32)}"
        key = ApiKey(id=key_id, name=name, scopes=scopes, max_in_flight=max_in_flight, rate=rate,
                     created_at=time.time(), webhook_secrets=(new_webhook_secret(),))
        sealed = self._seal(key_id, key.webhook_secrets)
        if not self.conn.hsetnx(NAMES_KEY, name, key_id):
            raise KeyCommandError(f"NAME: a key named {name!r} exists already")
        self.conn.hset(KEY_PREFIX + key_id, mapping={
            "id": key_id, "name": name, "hash": self.digest(text), "scopes": ",".join(sorted(s.value for s in scopes)),
            "max_in_flight": max_in_flight, "rate": rate or "", "created_at": key.created_at, "revoked_at": "",
            SECRETS_FIELD: sealed,
        })
        return replace(key, sealed_secrets=sealed), text

    def webhook_secrets(self, key: ApiKey) -> tuple[str, ...]:
        """The key's signing secrets in the clear, newest first; ``SecretsKeyError`` if no key given opens them."""
        return self._open(key.id, key.sealed_secrets)

    def reseal_all(self, plaintext_only: bool = False) -> Resealed:
        """Seal every key's secrets with the sealing key: those sealed with another (a rotation's old key)
        and those stored in the clear by an earlier version (only those with ``plaintext_only``)."""
        total = resealed = plaintext = 0
        refused: dict[str, str] = {}
        for key in self.list():
            total += 1
            stored = key.sealed_secrets
            if not stored or self.box.is_current(stored) or (plaintext_only and self.box.is_sealed(stored)):
                continue
            try:
                fresh = self._seal(key.id, self._open(key.id, stored))
            except SecretsKeyError as exc:
                refused[key.name] = str(exc)
                continue
            if self._swap(keys=[KEY_PREFIX + key.id], args=[SECRETS_FIELD, stored, fresh]):
                resealed += 1
                plaintext += not self.box.is_sealed(stored)
        return Resealed(total=total, resealed=resealed, plaintext=plaintext, kid=self.box.kid, refused=refused)

    def _seal(self, key_id: str, secrets_: Sequence[str]) -> str:
        return self.box.seal(json.dumps(list(secrets_)), f"{KEY_PREFIX}{key_id}/{SECRETS_FIELD}")

    def _open(self, key_id: str, stored: str) -> tuple[str, ...]:
        if not stored:
            return ()
        if not self.box.is_sealed(stored):  # in the clear, from before sealing: read it as it is
            return tuple(json.loads(stored))
        return tuple(json.loads(self.box.open(stored, f"{KEY_PREFIX}{key_id}/{SECRETS_FIELD}")))

    def get(self, key_id: str) -> ApiKey | None:
        raw = self.conn.hgetall(KEY_PREFIX + key_id)
        return _decode(raw) if raw else None  # type: ignore[arg-type]

    def by_name(self, name: str) -> ApiKey:
        key_id = self.conn.hget(NAMES_KEY, name)
        key = self.get(key_id.decode()) if isinstance(key_id, bytes) else None
        if key is None:
            raise KeyCommandError(f"NAME: no key named {name!r}")
        return key

    def authenticate(self, text: str) -> ApiKey | None:
        """The live key ``text`` is, or ``None`` (unknown, wrong or revoked)."""
        match = _KEY_RE.match(text)
        if not match:
            return None
        return self.verify(text, self.conn.hgetall(KEY_PREFIX + match.group(1)))  # type: ignore[arg-type]

    def verify(self, text: str, raw: dict[bytes, bytes]) -> ApiKey | None:
        """The live key ``text`` is, given its stored hash ``raw``; ``None`` if wrong or revoked."""
        if not raw or not hmac.compare_digest(raw.get(b"hash", b"").decode(), self.digest(text)):
            return None
        key = _decode(raw)
        return None if key.revoked_at else key

    @staticmethod
    def key_id(text: str) -> str | None:
        """The id in a well-formed key text, else ``None``."""
        match = _KEY_RE.match(text)
        return match.group(1) if match else None

    def list(self) -> list[ApiKey]:
        ids = [v.decode() for v in self.conn.hvals(NAMES_KEY)]  # type: ignore[union-attr]
        keys = [k for k in (self.get(i) for i in ids) if k is not None]
        return sorted(keys, key=lambda k: k.created_at)

    def revoke(self, name: str) -> ApiKey:
        key = self.by_name(name)
        if not key.revoked_at:
            self.conn.hset(KEY_PREFIX + key.id, "revoked_at", time.time())
        return self.by_name(name)

    def rotate_webhook_secret(self, name: str) -> tuple[ApiKey, str]:
        """A new signing secret first; the previous one still signs until the next rotation."""
        key = self.by_name(name)
        secret = new_webhook_secret()
        kept = (secret, *self.webhook_secrets(key))[:MAX_SECRETS]
        sealed = self._seal(key.id, kept)
        self.conn.hset(KEY_PREFIX + key.id, SECRETS_FIELD, sealed)
        return replace(self.by_name(name), webhook_secrets=kept), secret


def _decode(raw: dict[bytes, bytes]) -> ApiKey:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return ApiKey(
        id=f["id"], name=f["name"], scopes=frozenset(Scope(s) for s in f["scopes"].split(",") if s),
        max_in_flight=int(f.get("max_in_flight") or 0), rate=f.get("rate") or None,
        created_at=float(f.get("created_at") or 0), revoked_at=float(f["revoked_at"]) if f.get("revoked_at") else None,
        sealed_secrets=f.get(SECRETS_FIELD, ""),
    )
