"""The exceptions a caller of the producer library can meet, under one base class."""

from __future__ import annotations


class PixqError(Exception):
    """Base class of every error pixart-queue raises on purpose."""


class ConfigError(PixqError):
    """A setting is missing or malformed; the message names the variable."""


class InvalidRequest(PixqError):
    """A job request broke a rule; nothing was enqueued.

    ``errors`` holds one ``(field, message)`` pair per broken rule.
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))


class BrokerUnavailable(PixqError):
    """Redis could not be reached; the job was not submitted (nothing was left half-written)."""


class QueueFull(PixqError):
    """The model's queue is at its configured maximum depth; try again later."""


class JobNotFound(PixqError):
    """No job record has this id (never submitted, or expired after its retention)."""


class JobTimeout(PixqError):
    """``wait`` gave up before the job reached a terminal state."""


class JobFailed(PixqError):
    """The job ended ``failed`` or ``canceled``; ``record`` is the final job record."""

    def __init__(self, record: object, message: str):
        self.record = record
        super().__init__(message)
