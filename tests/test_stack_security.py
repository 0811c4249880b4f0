"""The local stack's exposure (issue 23, items 7 and 10): SeaweedFS's filer port no longer serves the
images that its S3 port guards with SigV4, and what Redis writes to disk is readable by its owner only."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

import pytest
import redis

from tests.services import S3Endpoint, start_redis
from tests.support import http, wait_for


def loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` (itself too) that its group or others may read, write or enter."""
    return [f"{p} {stat.filemode(p.stat().st_mode)}" for p in [root, *root.rglob("*")]
            if p.stat().st_mode & 0o077]


def test_the_filer_port_does_not_serve_a_stored_image_while_s3_with_sigv4_does(  # type: ignore[no-untyped-def]
        s3: S3Endpoint, s3_client) -> None:
    key = f"pixq/{uuid.uuid4().hex}/0.png"
    body = b"\x89PNG\r\n\x1a\n" + uuid.uuid4().bytes * 64
    s3_client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    assert s3_client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body  # SigV4
    assert s3.filer_url
    for path in (f"/buckets/{s3.bucket}/{key}", f"/buckets/{s3.bucket}/pixq/", "/buckets/"):
        status, answer = http(s3.filer_url + path)
        assert status == 401 and body not in answer, (path, status, answer[:200])
    status, _ = http(f"{s3.url}/{s3.bucket}/{key}")  # the S3 port without a signature
    assert status == 403
    presigned = s3_client.generate_presigned_url("get_object", Params={"Bucket": s3.bucket, "Key": key})
    assert http(presigned) == (200, body)


@pytest.mark.integration
def test_redis_data_of_a_local_stack_is_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as an earlier version left it
    svc, url = start_redis(data, password="owner-only-test-5e1", persist=True)
    try:
        with redis.Redis.from_url(url) as conn:
            conn.set("pixq:job:x", "a job record")
            conn.bgsave()
            wait_for(lambda: (data / "dump.rdb").exists() and any(data.glob("appendonlydir/*.aof")), 20,
                     "the RDB and AOF files")
        assert loose_modes(data) == []
    finally:
        svc.stop()
