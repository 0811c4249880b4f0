"""Many requests at once (``Client.submit_many``): their validation, one shape at a time.

A batch's requests often differ only in their prompts: the first request of each shape (the same
fields and values but the prompt) is validated in full, the others only for their prompts' own rules
(``JobRequest.with_prompt``); any doubt, and a request is validated in full, so the errors are the
ones ``submit`` gives. The batch is then planned (``submitplan.plan_batch``) and written by one script
(``recordscripts.CREATE_MANY``), each job as the per-job create script writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pixq.errors import InvalidRequest
from pixq.schema import JobRequest, parse_request

_SCALARS = (str, int, bool, type(None))


def _shape(data: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """A request's fields and values but its prompt, with their types (``True``, ``1`` and ``1.0`` differ
    to a strict schema); ``None`` when a value is not a plain scalar (a webhook): validated in full."""
    key: list[Any] = []
    for name, value in data.items():
        if name == "prompt":
            continue
        kind = type(value)
        if kind is float:
            value = repr(value)  # -0.0 is kept as sent
        elif kind not in _SCALARS:
            return None
        key.append((name, kind, value))
    return tuple(key)


def _parse(item: Mapping[str, Any], default_model: str, shapes: dict[tuple[Any, ...], JobRequest]) -> JobRequest:
    data = dict(item)
    data.setdefault("model_name", default_model)
    shape = _shape(data)
    template = shapes.get(shape) if shape is not None else None
    request = template.with_prompt(data.get("prompt")) if template is not None else None
    if request is None:
        template = parse_request(data)
        if shape is not None:
            shapes[shape] = template
        request = template.with_seed()
    return request


def parse_many(items: Iterable[JobRequest | Mapping[str, Any]], default_model: str,
               check: Callable[[JobRequest], None]) -> list[JobRequest]:
    """Each request validated, passed to ``check`` (which may raise ``InvalidRequest`` too), with its seed
    drawn; ``InvalidRequest`` naming every broken field by its request's index (``3.prompt``) when one is."""
    shapes: dict[tuple[Any, ...], JobRequest] = {}
    parsed: list[JobRequest] = []
    errors: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        try:
            request = item.with_seed() if isinstance(item, JobRequest) else _parse(item, default_model, shapes)
            check(request)
        except InvalidRequest as exc:
            errors += [(f"{i}.{field}", message) for field, message in exc.errors]
            continue
        parsed.append(request)
    if errors:
        raise InvalidRequest(errors)
    return parsed
