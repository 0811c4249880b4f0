"""Celery messages from a template (pixq/messages.py) are the messages Celery's builder makes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pixq.client import Client
from pixq.messages import PLACEHOLDER, MessageTemplates
from pixq.schema import parse_request
from pixq.wire import job_messages


def _comparable(raw: str) -> dict[str, Any]:
    message = json.loads(raw)
    message["properties"].pop("delivery_tag")  # kombu draws a fresh one per message
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message  # type: ignore[no-any-return]


@pytest.mark.parametrize("fields", [
    {"prompt": "a cactus"},
    {"prompt": 'quotes " and \\ and ünïcode ' + "long " * 30, "priority": 9, "width": 512, "height": 768},
    {"prompt": "low", "priority": 0, "seed": 7},
])
def test_templated_message_equals_celerys(client: Client, fields: dict[str, Any]) -> None:
    request = parse_request({"model_name": client.settings.model, **fields})
    templates = MessageTemplates(client._celery)
    for job_id in ("a" * 32, "0123456789abcdef0123456789abcdef"):
        ((queue, built),) = job_messages(client._celery, [(job_id, request)])
        ((t_queue, templated),) = templates.messages([(job_id, request)])
        assert t_queue == queue
        assert _comparable(templated) == _comparable(built)
        assert PLACEHOLDER not in templated
    tags = {json.loads(m)["properties"]["delivery_tag"] for _, m in templates.messages([("b" * 32, request)] * 3)}
    assert len(tags) == 3


def test_a_job_id_that_could_break_the_template_is_refused(client: Client) -> None:
    request = parse_request({"model_name": client.settings.model, "prompt": "x"})
    with pytest.raises(ValueError, match="letters and digits"):
        MessageTemplates(client._celery).messages([('a"b', request)])
