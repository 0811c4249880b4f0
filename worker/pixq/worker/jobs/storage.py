"""Storing finished images in S3-compatible storage under deterministic keys, and probing that it takes them.

A worker probes its store (``Storage.probe``: write and delete one object under its prefix) before it starts,
and again whenever an upload fails: a store that refuses the probe is down for this worker (the job goes back
to the queue and the worker pauses, ``storagewatch.py``); an upload refused while the probe passes is this
job's own problem (it fails).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from pixq.errors import StorageUnavailable
from pixq.records import ImageRecord
from pixq.s3 import make_s3_client
from pixq.schema import JobRequest, OutputFormat
from pixq.settings import Settings

log = logging.getLogger(__name__)

# S3 user metadata is sent as HTTP headers (ASCII) and capped at 2 KB in all.
_MAX_META_PROMPT = 512


# The store said no for good: retrying cannot help, so the job fails at once.
PERMANENT_CODES = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
     "InvalidBucketName", "AccountProblem", "InvalidArgument", "EntityTooLarge", "MethodNotAllowed"}
)


class StorageError(Exception):
    """An image could not be stored."""


class StorageRefused(StorageError):
    """This job's upload was refused for good (too large, a bad argument) while the store takes other writes:
    the job fails."""


class StorageDown(StorageError):
    """The store does not take this worker's writes (no such bucket, credentials refused, unreachable past the
    retry budget): the job goes back to the queue, an attempt counted, and the worker pauses."""


# A probe must answer within seconds: a short connect timeout, one retry. The worker's probes are bounded
# by this, not by the uploads' five attempts with backoff.
PROBE_CONFIG: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 2}, "connect_timeout": 3,
                                "read_timeout": 10}
PROBE_FOLDER = ".pixq-probe"  # under the prefix; a job id is alphanumeric, so no job's key can be here


def is_permanent(exc: Exception) -> bool:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in PERMANENT_CODES or (400 <= int(status or 0) < 500 and status not in (408, 429))
    return False


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


def make_probe_client(settings: Settings, client: Any) -> Any:
    """A client like ``client`` (``pixq.s3.make_s3_client``'s) whose calls give up within seconds."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(  # its own session, as make_s3_client's: credentials read afresh
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region,
        config=client.meta.config.merge(Config(**PROBE_CONFIG)))


class Storage:
    """One bucket behind a boto3 client; credentials come from the standard AWS chain."""

    def __init__(self, settings: Settings, client: Any = None, retry_budget_s: float = 120.0):
        self.bucket = settings.require_bucket()
        self.prefix = settings.s3_prefix
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self.client = client or make_s3_client(settings)
        # A client handed in (tests, benchmarks) probes as it is; ours get a quick-failing twin.
        self.probe_client = self.client if client is not None else make_probe_client(settings, self.client)
        self.retry_budget_s = retry_budget_s

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/ at {self.endpoint}"

    def probe(self) -> None:
        """Write and delete one small object under the prefix; ``StorageUnavailable`` says why not."""
        key = f"{self.prefix}/{PROBE_FOLDER}/{uuid.uuid4().hex}"
        try:
            self.probe_client.put_object(Bucket=self.bucket, Key=key, Body=b"pixq worker storage probe\n")
            self.probe_client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise StorageUnavailable(f"cannot write and delete under {self.where()}: {_describe(exc)}") from exc

    def put_image(
        self, job_id: str, index: int, data: bytes, request: JobRequest, seed: int,
        keep_going: Callable[[], bool] = lambda: True,
        store_answers: Callable[[], bool] = lambda: True,
    ) -> ImageRecord:
        """Store one image, riding out an unreachable or failing store.

        botocore's standard retry mode retries each call a few times. When that fails,
        ``store_answers()`` (the worker's probe, ``storagewatch.StorageWatch.check``) tells the store's
        fault from this upload's: a refusal the store also gives the probe (no such bucket, credentials
        refused) raises ``StorageDown`` at once; one it does not give (the image too large) ``StorageRefused``.
        Otherwise this keeps trying with backoff for ``retry_budget_s`` (the rendered bytes are kept, so
        nothing is rendered again) while ``keep_going()`` holds, then raises ``StorageDown``.
        """
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.5
        probed = False
        while True:
            try:
                return self._put_once(job_id, index, data, request, seed)
            except Exception as exc:
                answers = True
                if not probed:
                    probed = True
                    answers = store_answers()
                if is_permanent(exc):
                    refusal = f"S3 refused the upload to bucket {self.bucket!r}: {_describe(exc)}"
                    raise (StorageRefused if answers else StorageDown)(refusal) from exc
                if time.monotonic() + delay > deadline or not keep_going():
                    raise StorageDown(f"S3 unreachable for {self.retry_budget_s:.0f} s: {_describe(exc)}") from exc
                log.warning("job %s: upload of image %d failed (%s); retrying in %.1f s",
                            job_id, index, _describe(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _put_once(self, job_id: str, index: int, data: bytes, request: JobRequest, seed: int) -> ImageRecord:
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


def _describe(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
