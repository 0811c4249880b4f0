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


_ID, _BODY, _TAG, _SHOWN = "@@pixq-id@@", "@@pixq-body@@", "@@pixq-tag@@", "@@pixq-shown@@"


class _Prototype:
    """One message Celery built, as JSON text with marks where each job's own values go."""

    def __init__(self, queue: str, raw: str):
        self.queue = queue
        message: dict[str, Any] = json.loads(raw)
        headers, properties = message["headers"], message["properties"]
        if properties.get("body_encoding") != "base64":
            raise RuntimeError("pixq.messages: kombu no longer base64-encodes message bodies; update the template")
        self.body = base64.b64decode(message["body"]).decode()
        moved = {"id", "root_id", "kwargsrepr"}
        leftover = [k for k, v in headers.items() if k not in moved and PLACEHOLDER in json.dumps(v)]
        leftover += [k for k, v in properties.items() if k != "correlation_id" and PLACEHOLDER in json.dumps(v)]
        if leftover or headers["id"] != PLACEHOLDER or properties["correlation_id"] != PLACEHOLDER:
            raise RuntimeError(f"pixq.messages: Celery puts the task id where the template does not ({leftover})")
        headers["id"] = headers["root_id"] = properties["correlation_id"] = _ID
        headers["kwargsrepr"], properties["delivery_tag"], message["body"] = _SHOWN, _TAG, _BODY
        self.text = json.dumps(message)

    def render(self, job_id: str, shown: str) -> str:
        body = base64.b64encode(self.body.replace(PLACEHOLDER, job_id).encode()).decode()
        text = self.text.replace(_ID, job_id).replace(_BODY, body).replace(_TAG, str(uuid.uuid4()))
        return text.replace(f'"{_SHOWN}"', json.dumps(shown))  # last: the prompt in it is not searched for marks


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
