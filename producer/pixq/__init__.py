"""pixq: validate PixArt-Σ jobs and enqueue them; read their records (distribution ``pixart-queue``).

    from pixq import Client, Settings
    client = Client(Settings.from_env(os.environ))
    job = client.submit("A small cactus with a happy face", seed=7)
    record = job.wait(timeout_s=120)

Light by design: no torch, no worker code. The GPU worker is the separate distribution
``pixart-queue-worker`` (folder ``worker/``), which installs the sub-package ``pixq.worker`` into this
package: ``extend_path`` below lets it live in its own folder during development (both folders on
``sys.path``); installed, both land in one ``site-packages/pixq``.

The names below are imported on first use (PEP 562), so that ``pixq --help`` does not pay for
Redis, Celery and pydantic.
"""

from __future__ import annotations

import importlib
from pkgutil import extend_path
from typing import TYPE_CHECKING, Any

__path__ = extend_path(__path__, __name__)

if TYPE_CHECKING:
    from pixq.client import Client, Job
    from pixq.errors import (
        BrokerUnavailable,
        ConfigError,
        InvalidRequest,
        JobFailed,
        JobNotFound,
        JobTimeout,
        MissingComponent,
        NoWorkerWarning,
        PixqError,
        QueueFull,
        ServiceUnavailable,
        StorageUnavailable,
    )
    from pixq.records import ImageRecord, JobError, JobRecord, JobState
    from pixq.schema import JobRequest, OutputFormat, parse_request, request_schema
    from pixq.settings import Settings

_WHERE = {
    "pixq.client": ("Client", "Job"),
    "pixq.errors": ("BrokerUnavailable", "ConfigError", "InvalidRequest", "JobFailed", "JobNotFound", "JobTimeout",
                    "MissingComponent", "NoWorkerWarning", "PixqError", "QueueFull", "ServiceUnavailable",
                    "StorageUnavailable"),
    "pixq.records": ("ImageRecord", "JobError", "JobRecord", "JobState"),
    "pixq.schema": ("JobRequest", "OutputFormat", "parse_request", "request_schema"),
    "pixq.settings": ("Settings",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "BrokerUnavailable", "Client", "ConfigError", "ImageRecord", "InvalidRequest", "Job", "JobError", "JobFailed",
    "JobNotFound", "JobRecord", "JobRequest", "JobState", "JobTimeout", "MissingComponent", "NoWorkerWarning",
    "OutputFormat", "PixqError", "QueueFull", "ServiceUnavailable", "Settings", "StorageUnavailable",
    "parse_request", "request_schema",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pixq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
