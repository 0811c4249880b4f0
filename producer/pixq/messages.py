"""Celery task messages from a template: one built by Celery per (model, priority), copied per job.

``pixq.wire.job_messages`` builds each message with Celery's protocol-v2 builder and kombu's Redis
channel (~70 µs a job). Everything in such a message but the job id (the task id, root id,
correlation id, the body's ``job_id``), the shown arguments (``kwargsrepr``) and kombu's fresh
delivery tag is the same for every job of a model and priority. So the first job of each builds its
message through Celery, with a placeholder id; every job after copies that one with its own values.
The worker reads the same message either way (``tests/test_messages.py`` compares the two).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import TYPE_CHECKING, Any

from pixq.schema import JobRequest
from pixq.wire import job_messages, kwargs_repr

if TYPE_CHECKING:
    from celery import Celery

PLACEHOLDER = "0" * 31 + "f"  # a job id's shape (uuid4 hex); it never names a real job


class _Prototype:
    def __init__(self, queue: str, raw: str):
        self.queue = queue
        self.message: dict[str, Any] = json.loads(raw)
        self.headers: dict[str, Any] = self.message["headers"]
        self.properties: dict[str, Any] = self.message["properties"]
        if self.message["properties"].get("body_encoding") != "base64":
            raise RuntimeError("pixq.messages: kombu no longer base64-encodes message bodies; update the template")
        self.body = base64.b64decode(self.message["body"]).decode()
        moved = {"id", "root_id", "kwargsrepr"}
        leftover = [k for k, v in self.headers.items() if k not in moved and PLACEHOLDER in json.dumps(v)]
        leftover += [k for k, v in self.properties.items() if k != "correlation_id" and PLACEHOLDER in json.dumps(v)]
        if leftover or self.headers["id"] != PLACEHOLDER or self.properties["correlation_id"] != PLACEHOLDER:
            raise RuntimeError(f"pixq.messages: Celery puts the task id where the template does not ({leftover})")

    def render(self, job_id: str, shown: str) -> str:
        headers = dict(self.headers)
        headers["id"] = headers["root_id"] = job_id
        headers["kwargsrepr"] = shown
        properties = dict(self.properties)
        properties["correlation_id"] = job_id
        properties["delivery_tag"] = str(uuid.uuid4())
        message = dict(self.message)
        message["body"] = base64.b64encode(self.body.replace(PLACEHOLDER, job_id).encode()).decode()
        message["headers"], message["properties"] = headers, properties
        return json.dumps(message)


class MessageTemplates:
    """``messages(jobs)``: the same (Redis list, message) pairs as ``job_messages``, from templates."""

    def __init__(self, app: Celery):
        self.app = app
        self._prototypes: dict[tuple[str, int], _Prototype] = {}

    def has(self, request: JobRequest) -> bool:
        return (request.model_name, request.priority) in self._prototypes

    def prototype(self, request: JobRequest) -> _Prototype:
        key = (request.model_name, request.priority)
        proto = self._prototypes.get(key)
        if proto is None:
            ((queue, raw),) = job_messages(self.app, [(PLACEHOLDER, request)])
            proto = self._prototypes[key] = _Prototype(queue, raw)
        return proto

    def messages(self, jobs: list[tuple[str, JobRequest]]) -> list[tuple[str, str]]:
        out = []
        for job_id, request in jobs:
            if not job_id.isalnum():
                raise ValueError(f"job id {job_id!r}: letters and digits only")
            proto = self.prototype(request)
            out.append((proto.queue, proto.render(job_id, kwargs_repr(job_id, request))))
        return out
