"""Storing finished images in S3-compatible storage under deterministic keys."""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import quote

from producer.records import ImageRecord
from producer.schema import JobRequest, OutputFormat
from producer.s3 import make_s3_client
from producer.settings import Settings

log = logging.getLogger(__name__)

# S3 user metadata is sent as HTTP headers (ASCII) and capped at 2 KB in all.
_MAX_META_PROMPT = 512


class StorageError(Exception):
    """An image could not be stored (after botocore's own retries)."""


def object_key(prefix: str, job_id: str, index: int, fmt: OutputFormat) -> str:
    """``{prefix}/{job_id}/{index}.{ext}``: built only from server-side values."""
    return f"{prefix}/{job_id}/{index}.{fmt.extension}"


def object_metadata(request: JobRequest, job_id: str, index: int, seed: int, digest: str) -> dict[str, str]:
    prompt = quote(request.prompt, safe=" ,.")[:_MAX_META_PROMPT]
    negative = quote(request.negative_prompt, safe=" ,.")[:_MAX_META_PROMPT]
    return {
        "job-id": job_id,
        "index": str(index),
        "seed": str(seed),
        "model": quote(request.model_name, safe="/"),
        "steps": str(request.num_inference_steps),
        "guidance-scale": repr(request.guidance_scale),
        "width": str(request.width),
        "height": str(request.height),
        "prompt": prompt,  # percent-encoded, cut to fit the metadata limit
        "negative-prompt": negative,
        "prompt-sha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
        "sha256": digest,
    }


class Storage:
    """One bucket behind a boto3 client; credentials come from the standard AWS chain."""

    def __init__(self, settings: Settings, client: Any = None):
        self.bucket = settings.require_bucket()
        self.prefix = settings.s3_prefix
        self.client = client or make_s3_client(settings)

    def put_image(self, job_id: str, index: int, data: bytes, request: JobRequest, seed: int) -> ImageRecord:
        """Store one encoded image; a key already written by an earlier attempt is kept as is."""
        fmt = request.output_format
        key = object_key(self.prefix, job_id, index, fmt)
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=fmt.content_type,
                Metadata=object_metadata(request, job_id, index, seed, digest),
                IfNoneMatch="*",  # never overwrite an image that was already delivered
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            digest = head.get("Metadata", {}).get("sha256", "")
            size = int(head["ContentLength"])
            log.info("image %s already stored by an earlier attempt; kept", key)
        return ImageRecord(
            index=index,
            bucket=self.bucket,
            key=key,
            width=request.width,
            height=request.height,
            seed=seed,
            content_type=fmt.content_type,
            size_bytes=size,
            sha256=digest,
        )
