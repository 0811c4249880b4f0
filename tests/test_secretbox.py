"""Webhook secrets sealed at rest (issue 23, item 7): the box on its own, then the key store on a real
Redis of its own (re-sealing walks every key: the session's Redis holds other modules' keys), for what is
stored, a wrong key, and secrets stored in the clear by an earlier version."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import pytest
import redis
from pixq.api.config import ApiSettings
from pixq.api.keys import KEY_PREFIX, KeyStore, Scope
from pixq.api.secretbox import SecretBox, SecretsKeyError, key_id, parse_secrets_keys
from pixq.errors import ConfigError

from tests.apitools import PEPPER
from tests.services import start_redis


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    svc, url = start_redis(tmp_path_factory.mktemp("secrets-redis"))
    conn = redis.Redis.from_url(url)
    yield conn
    conn.close()
    svc.stop()


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def box(*keys: str) -> SecretBox:
    return SecretBox.for_settings(keys, PEPPER)


def test_a_sealed_value_opens_only_with_its_key_and_where_it_was_stored() -> None:
    k1 = new_key()
    sealed = box(k1).seal("whsec_abc", "pixq:apikey:1/webhook_secrets")
    assert "whsec_abc" not in sealed and sealed != box(k1).seal("whsec_abc", "pixq:apikey:1/webhook_secrets")
    assert box(k1).open(sealed, "pixq:apikey:1/webhook_secrets") == "whsec_abc"
    with pytest.raises(SecretsKeyError, match="copied from elsewhere"):
        box(k1).open(sealed, "pixq:apikey:2/webhook_secrets")  # moved to another key's record
    head, _, body = sealed.rpartition(":")  # one byte of the sealed bytes flipped (a base64 character could differ
    raw = bytearray(base64.urlsafe_b64decode(body))  # only in padding bits, which decode to the same bytes)
    raw[len(raw) // 2] ^= 0x01
    altered = f"{head}:{base64.urlsafe_b64encode(bytes(raw)).decode()}"
    with pytest.raises(SecretsKeyError, match="altered"):
        box(k1).open(altered, "pixq:apikey:1/webhook_secrets")


def test_a_wrong_key_names_the_key_the_value_needs() -> None:
    k1, k2 = new_key(), new_key()
    sealed = box(k1).seal("whsec_abc", "ctx")
    kid = key_id(base64.b64decode(k1))
    with pytest.raises(SecretsKeyError, match=f"sealed with encryption key {kid}, which PIXQ_SECRETS_KEY does not "
                                              "hold") as refused:
        box(k2).open(sealed, "ctx")
    assert k1 not in str(refused.value) and k2 not in str(refused.value)
    assert refused.value.exit_code == 2  # a ConfigError: `pixq` says it in one line and exits 2


def test_a_rotation_seals_with_the_first_key_and_opens_with_any() -> None:
    old, new = new_key(), new_key()
    before = box(old).seal("s", "ctx")
    rotating = box(new, old)
    assert rotating.open(before, "ctx") == "s" and not rotating.is_current(before)
    after = rotating.seal("s", "ctx")
    assert rotating.is_current(after) and box(new).open(after, "ctx") == "s"
    # The key derived from the pepper (no PIXQ_SECRETS_KEY) always opens: setting one later needs no old key.
    assert box(new).open(box().seal("s", "ctx"), "ctx") == "s"


def test_pixq_secrets_key_is_checked_and_never_echoed() -> None:
    good, bad = new_key(), "not-a-key-" + "x" * 30
    assert parse_secrets_keys(f" {good} , {new_key()} ")[0] == good
    assert parse_secrets_keys(base64.urlsafe_b64encode(os.urandom(32)).decode())  # the url-safe alphabet too
    for raw in (bad, f"{good},{bad}", base64.b64encode(os.urandom(16)).decode()):
        with pytest.raises(ConfigError, match=r"PIXQ_SECRETS_KEY: entry \d is not a base64 32-byte key") as refused:
            ApiSettings.from_env({"PIXQ_SECRETS_KEY": raw})
        assert bad not in str(refused.value)
    assert ApiSettings.from_env({"PIXQ_SECRETS_KEY": good}).secrets_keys == (good,)


@pytest.mark.integration
def test_redis_holds_no_webhook_secret_in_the_clear(own_redis: redis.Redis) -> None:
    k1 = new_key()
    store = KeyStore(own_redis, PEPPER, (k1,))
    key, _ = store.create(f"sealed-{os.urandom(3).hex()}", frozenset({Scope.submit}))
    (secret,) = key.webhook_secrets
    _, rotated = store.rotate_webhook_secret(key.name)
    stored: dict[bytes, bytes] = own_redis.hgetall(KEY_PREFIX + key.id)  # type: ignore[assignment]
    everything = b"".join(k + v for k, v in stored.items())
    for s in (secret, rotated):
        assert s.encode() not in everything and s.removeprefix("whsec_").encode() not in everything
        assert base64.b64decode(s.removeprefix("whsec_")) not in everything
    assert stored[b"webhook_secrets"].startswith(f"pixq-sealed:v1:{key_id(base64.b64decode(k1))}:".encode())
    assert store.webhook_secrets(store.by_name(key.name)) == (rotated, secret)
    with pytest.raises(SecretsKeyError, match="PIXQ_SECRETS_KEY does not hold"):
        KeyStore(own_redis, PEPPER, (new_key(),)).webhook_secrets(store.by_name(key.name))


@pytest.mark.integration
def test_secrets_in_the_clear_from_before_are_read_then_sealed(own_redis: redis.Redis) -> None:
    k1, k2 = new_key(), new_key()
    store = KeyStore(own_redis, PEPPER, (k1,))
    key, _ = store.create(f"legacy-{os.urandom(3).hex()}", frozenset({Scope.read}))
    old = KeyStore(own_redis, PEPPER, (k2,)).create(f"old-key-{os.urandom(3).hex()}", frozenset({Scope.read}))[0]
    legacy = ["whsec_" + base64.b64encode(os.urandom(24)).decode()]
    own_redis.hset(KEY_PREFIX + key.id, "webhook_secrets", json.dumps(legacy))  # as versions before sealing wrote it
    assert store.webhook_secrets(store.by_name(key.name)) == tuple(legacy)
    done = store.reseal_all(plaintext_only=True)  # what a relay does at its start
    assert done.plaintext >= 1 and old.name not in done.refused  # sealed with k2: not a relay's business
    assert legacy[0].encode() not in own_redis.hget(KEY_PREFIX + key.id, "webhook_secrets")  # type: ignore[operator]
    assert store.webhook_secrets(store.by_name(key.name)) == tuple(legacy)
    done = store.reseal_all()  # `pixq keys rotate-encryption` without k2: that key is named, the others done
    assert "PIXQ_SECRETS_KEY does not hold" in done.refused[old.name]
    done = KeyStore(own_redis, PEPPER, (k1, k2)).reseal_all()
    assert old.name not in done.refused and store.webhook_secrets(store.by_name(old.name)) == old.webhook_secrets
