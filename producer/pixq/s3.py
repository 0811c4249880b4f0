"""The boto3 S3 client both sides use: any S3-compatible endpoint, path-style, standard retries."""

from __future__ import annotations

from typing import Any

from pixq.settings import Settings


def make_s3_client(settings: Settings) -> Any:
    """A client for ``PIXQ_S3_ENDPOINT_URL`` (AWS when unset); credentials from the AWS chain.

    Each client has its own boto3 session: the module-level default session resolves the credential chain once and
    keeps the answer, so a client made later in the same process would sign with whatever the first one found.
    """
    import boto3  # imported here: only URL and download paths of the producer need it
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        config=Config(
            s3={"addressing_style": "path"},
            # SigV4 everywhere: botocore still presigns SigV2 URLs for us-east-1 without it, which S3
            # refuses for SSE-KMS objects and SigV4-only stores do not accept at all.
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=30,
        ),
    )
