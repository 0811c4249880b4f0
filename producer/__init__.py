"""pixart-queue's producer: validate PixArt-Σ jobs and enqueue them; read their records.

    from producer import Client, Settings
    client = Client(Settings.from_env(os.environ))
    job = client.submit("A small cactus with a happy face", seed=7)
    record = job.wait(timeout_s=120)

Light by design: no torch, no worker code.
"""

from producer.client import Client, Job
from producer.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PixqError,
    QueueFull,
)
from producer.records import ImageRecord, JobError, JobRecord, JobState
from producer.schema import JobRequest, OutputFormat, parse_request, request_schema
from producer.settings import Settings

__all__ = [
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "ImageRecord",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobRecord",
    "JobRequest",
    "JobState",
    "JobTimeout",
    "OutputFormat",
    "PixqError",
    "QueueFull",
    "Settings",
    "parse_request",
    "request_schema",
]
