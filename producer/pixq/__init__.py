"""pixq: validate PixArt-Σ jobs and enqueue them; read their records (distribution ``pixart-queue``).

    from pixq import Client, Settings
    client = Client(Settings.from_env(os.environ))
    job = client.submit("A small cactus with a happy face", seed=7)
    record = job.wait(timeout_s=120)

Light by design: no torch, no worker code. The GPU worker is the separate distribution
``pixart-queue-worker`` (folder ``worker/``), which installs the sub-package ``pixq.worker`` into this
package: ``extend_path`` below lets it live in its own folder during development (both folders on
``sys.path``); installed, both land in one ``site-packages/pixq``.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)


from pixq.client import Client, Job
from pixq.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PixqError,
    QueueFull,
)
from pixq.records import ImageRecord, JobError, JobRecord, JobState
from pixq.schema import JobRequest, OutputFormat, parse_request, request_schema
from pixq.settings import Settings

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
