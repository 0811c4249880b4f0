"""The exceptions a caller of pixart-queue can meet, under one base class, and the one place where a
service's own exceptions (redis, kombu, botocore) become ours.

Each class carries the exit code the ``pixq`` command ends with when it stops a command (the
README's command-line section lists them): scripts can tell a bad request from a service that is
down without reading the message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class PixqError(Exception):
    """Base class of every error pixart-queue raises on purpose."""

    exit_code = 1


class ConfigError(PixqError):
    """A setting or a command-line value is missing or malformed; the message names it."""

    exit_code = 2


class InvalidRequest(PixqError):
    """A job request (or an operation on a job) broke a rule; nothing was written.

    ``errors`` holds one ``(field, message)`` pair per broken rule.
    """

    exit_code = 3

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))


class JobNotFound(PixqError):
    """No job record has this id (never submitted, or expired after its retention)."""

    exit_code = 4


class QueueFull(PixqError):
    """The model's queue is at its configured maximum depth; try again later."""

    exit_code = 5


class QuotaExceeded(QueueFull):
    """The API key already has its ``--max-in-flight`` unfinished jobs; try again once one ends."""

    exit_code = 5


class JobTimeout(PixqError):
    """``wait`` gave up before the job reached a terminal state."""

    exit_code = 6


class JobFailed(PixqError):
    """The job ended ``failed`` or ``canceled``; ``record`` is the final job record."""

    exit_code = 1

    def __init__(self, record: object, message: str):
        self.record = record
        super().__init__(message)


class ServiceUnavailable(PixqError):
    """A service the operation needs could not be reached or refused it."""

    exit_code = 7


class BrokerUnavailable(ServiceUnavailable):
    """Redis could not be reached or refused us (wrong password, ...); a submit left nothing half-written."""

    exit_code = 7


class OutcomeUnknown(BrokerUnavailable):
    """Redis went away after a submit was sent and before its reply, and stayed away for the undo: the
    job may exist. The message names its id; ``pixq status ID`` tells, an idempotency key makes a
    repeat safe."""

    exit_code = 7


class NotDurable(BrokerUnavailable):
    """Redis did not confirm a write on the required number of replicas (``WAIT``) in time: the
    operation is not reported done (it may still take effect; resubmit with an idempotency key)."""

    exit_code = 7


class StorageUnavailable(ServiceUnavailable):
    """S3 could not be reached, refused the credentials, or lacks the bucket or the object."""

    exit_code = 8


class MissingComponent(PixqError):
    """The command belongs to a distribution that is not installed (e.g. pixart-queue-worker)."""

    exit_code = 9


class WorkerNameTaken(PixqError):
    """A live worker already holds the worker name asked for (two processes never share a lease identity)."""

    exit_code = 10


class NoWorkerWarning(UserWarning):
    """A job was queued for a model that no live worker serves: it waits until one starts."""


# -- mapping services' exceptions ----------------------------------------------------------------
# The classes are looked up in sys.modules rather than imported: an exception from a library that
# was never imported cannot be raised, and ``pixq --help`` must not pay for importing them.

_S3_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "AuthorizationHeaderMalformed"}


def service_error(exc: BaseException, doing: str = "") -> PixqError | None:
    """``exc`` as one of ours when it is a Redis, kombu or botocore failure, else ``None``.

    ``doing`` (e.g. "job not submitted") is added to the message to say what did not happen.
    """
    mapped = _redis_error(exc) or _kombu_error(exc) or _botocore_error(exc)
    if mapped is not None and doing:
        mapped = type(mapped)(f"{mapped}; {doing}")
    return mapped


@contextmanager
def service_errors(doing: str = "") -> Iterator[None]:
    """Run the block, turning a service's exception into ours (``raise ... from`` the original)."""
    try:
        yield
    except PixqError:
        raise
    except Exception as exc:
        mapped = service_error(exc, doing)
        if mapped is None:
            raise
        raise mapped from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _redis_error(exc: BaseException) -> PixqError | None:
    redis_exc = getattr(sys.modules.get("redis"), "exceptions", None)
    if redis_exc is None or not isinstance(exc, redis_exc.RedisError):
        return None
    text = _one_line(exc)
    if isinstance(exc, redis_exc.AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH", "invalid username")):
        return BrokerUnavailable(f"Redis refused the login: {text} (check the user and password in PIXQ_REDIS_URL)")
    if isinstance(exc, redis_exc.ResponseError) and "DB index is out of range" in text:
        return ConfigError(f"PIXQ_REDIS_URL: the database number is past the server's last one ({text})")
    if isinstance(exc, (redis_exc.ConnectionError, redis_exc.TimeoutError)):
        return BrokerUnavailable(f"Redis unreachable: {text}")
    return BrokerUnavailable(f"Redis error: {text}")


def _kombu_error(exc: BaseException) -> PixqError | None:
    kombu_exc = sys.modules.get("kombu.exceptions")
    if kombu_exc is None or not isinstance(exc, kombu_exc.OperationalError):
        return None
    # kombu wraps the transport's error; say what Redis said.
    cause = exc.__cause__ or exc.__context__
    inner = _redis_error(cause) if cause is not None else None
    if inner is not None:
        return inner
    return BrokerUnavailable(f"Redis unreachable (broker): {_one_line(exc)}")


def _botocore_error(exc: BaseException) -> PixqError | None:
    boto_exc = sys.modules.get("botocore.exceptions")
    if boto_exc is None:
        return None
    if isinstance(exc, boto_exc.NoCredentialsError):
        return StorageUnavailable("S3: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                  "or another source of the AWS credential chain)")
    if isinstance(exc, boto_exc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        if code in _S3_CREDENTIAL_CODES:
            return StorageUnavailable(f"S3 refused the credentials: {code}: {message} (check AWS_ACCESS_KEY_ID "
                                      "and AWS_SECRET_ACCESS_KEY)")
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            return StorageUnavailable(f"S3: not found: {code}: {message}")
        return StorageUnavailable(f"S3 error: {code}: {message}")
    if isinstance(exc, (boto_exc.EndpointConnectionError, boto_exc.ConnectTimeoutError,
                        boto_exc.ReadTimeoutError, boto_exc.ConnectionClosedError)):
        return StorageUnavailable(f"S3 unreachable: {_one_line(exc)}")
    if isinstance(exc, boto_exc.BotoCoreError):
        return StorageUnavailable(f"S3 error: {_one_line(exc)}")
    return None
