"""Create the bucket PIXQ_S3_BUCKET names when it is missing, then prove it takes writes (compose's s3-init).

Reads the same PIXQ_* / AWS_* variables as the worker and builds the same S3 client, so the
bucket is made exactly where, and the way, the worker will write. Idempotent; waits for a
store that is still starting.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pixq.errors import ConfigError
from pixq.s3 import make_s3_client
from pixq.settings import Settings


def ensure_bucket(s3: Any, bucket: str, region: str, probe_key: str) -> bool:
    """Create ``bucket`` if absent and check it takes a write at ``probe_key``; True if it was created."""
    created = False
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **extra)
        created = True
    # Under the prefix the worker writes to: a policy scoped to that prefix allows it.
    s3.put_object(Bucket=bucket, Key=probe_key, Body=b"ok")
    return created


def main(timeout_s: float = 120.0) -> int:
    try:
        settings = Settings.from_env(os.environ)
        bucket = settings.require_bucket()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s3 = make_s3_client(settings)
    try:
        return _wait_for_bucket(s3, settings, bucket, time.monotonic() + timeout_s)
    finally:
        s3.close()


def _wait_for_bucket(s3: object, settings: Settings, bucket: str, deadline: float) -> int:
    while True:
        try:
            created = ensure_bucket(s3, bucket, settings.aws_region, f"{settings.s3_prefix}/.pixq-init")
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                print(f"error: bucket {bucket!r} at {settings.s3_endpoint_url or 'AWS'}: {exc}", file=sys.stderr)
                return 1
            time.sleep(1.0)
            continue
        print(f"bucket {bucket} {'created' if created else 'exists'} and takes writes")
        return 0


if __name__ == "__main__":
    sys.exit(main())
