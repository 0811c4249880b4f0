"""Secrets sealed at rest: AES-256-GCM under keys that live in the environment, never in Redis.

``PIXQ_SECRETS_KEY`` lists base64 32-byte keys, comma-separated (``openssl rand -base64 32``): the
first seals, every one opens, so a rotation lists the new key beside the old one until
``pixq keys rotate-encryption`` has re-sealed everything. Without it the key is derived from
``PIXQ_API_KEY_PEPPER`` (HKDF-SHA256): also only in the environment, so a copy of Redis, its AOF or
an RDB file alone still reveals no secret. That derived key always opens, so setting
``PIXQ_SECRETS_KEY`` later needs no old key listed.

A sealed value reads ``pixq-sealed:v1:<key id>:<base64url(nonce | ciphertext | tag)>``. The key id
(the first 4 bytes of the key's SHA-256, in hex) says which key opens it, so a missing key is named in
the error; the associated data is where the value is stored, so a value copied elsewhere does not open.
``cryptography`` is imported only when a box is built: ``pixq --help`` does not load it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from pixq.errors import ConfigError

PREFIX = "pixq-sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
_DERIVE_INFO = b"pixq webhook secrets v1"
GENERATE_HINT = "`openssl rand -base64 32`"


class SecretsKeyError(ConfigError):
    """A sealed value cannot be opened with the keys given: none of them is the one it names, or it was altered."""


def parse_secrets_keys(raw: str) -> tuple[str, ...]:
    """``PIXQ_SECRETS_KEY``'s entries, each checked to be a base64 32-byte key (never echoed back)."""
    entries = tuple(part.strip() for part in raw.split(",") if part.strip())
    for n, entry in enumerate(entries, 1):
        if len(_decode_key(entry)) != KEY_BYTES:
            raise ConfigError(f"PIXQ_SECRETS_KEY: entry {n} is not a base64 32-byte key (make one with "
                              f"{GENERATE_HINT}; several, comma-separated, during a rotation)")
    return entries


def _decode_key(entry: str) -> bytes:
    try:
        return base64.b64decode(entry.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return b""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def derived_key(pepper: str) -> bytes:
    """The sealing key when ``PIXQ_SECRETS_KEY`` is unset: HKDF-SHA256 of the API key pepper."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_DERIVE_INFO).derive(pepper.encode())


class SecretBox:
    """Seal with the first key, open with any. ``context`` (where the value is stored) is bound to it."""

    def __init__(self, keys: Sequence[bytes]):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise ValueError("a SecretBox needs at least one key")
        self._ciphers: dict[str, Any] = {}
        for key in keys:
            self._ciphers.setdefault(key_id(key), AESGCM(key))
        self.kid = key_id(keys[0])

    @classmethod
    def for_settings(cls, secrets_keys: Sequence[str], pepper: str) -> SecretBox:
        """The keys ``PIXQ_SECRETS_KEY`` lists (first seals), then the one derived from the pepper."""
        return cls([*(_decode_key(k) for k in secrets_keys), derived_key(pepper)])

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    @staticmethod
    def is_sealed(value: str) -> bool:
        return value.startswith(PREFIX)

    def is_current(self, value: str) -> bool:
        """Sealed with the key that seals now (nothing for a re-seal to do)."""
        return value.startswith(f"{PREFIX}{self.kid}:")

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.kid].encrypt(nonce, plaintext.encode(), context.encode())
        return f"{PREFIX}{self.kid}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, value: str, context: str) -> str:
        """The plaintext of a value ``seal`` made for ``context``; ``SecretsKeyError`` says why not."""
        from cryptography.exceptions import InvalidTag

        kid, _, body = value.removeprefix(PREFIX).partition(":")
        if not self.is_sealed(value) or not body:
            raise SecretsKeyError(f"{context}: not a sealed value")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretsKeyError(
                f"{context} is sealed with encryption key {kid}, which PIXQ_SECRETS_KEY does not hold (it holds "
                f"{', '.join(self.kids)}): list the old key after the new one until `pixq keys rotate-encryption` "
                "has re-sealed everything")
        try:
            raw = base64.urlsafe_b64decode(body)
            return str(cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsKeyError(f"{context}: the sealed value under key {kid} does not open: altered, "
                                  "or copied from elsewhere") from None
