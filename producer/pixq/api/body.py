"""Request bodies as JSON, strictly: nesting at most ``MAX_DEPTH`` deep, every object key once.

``json.loads`` alone accepts ``{"prompt": "", "prompt": "x"}`` (the last wins: a proxy or a logger
that reads the first sees another request than the one run) and hits Python's recursion limit on
~1,000 nested brackets (a 2 KB body answered 500). Both are the caller's mistakes: ``BodyRefused``
says which, and the routes answer it as a 4xx.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # a job request nests 3 deep (the webhook's events)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class BodyRefused(ValueError):
    """Not a body the API reads: ``field`` names the duplicated key, or is ``None`` for the body."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def loads(body: bytes) -> Any:
    """The JSON value of ``body``; ``BodyRefused`` for nesting past ``MAX_DEPTH`` or a repeated key,
    ``ValueError`` for anything else that is not JSON."""
    # Counting brackets is C-speed; the exact depth is worked out only for a body with many of them.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise BodyRefused(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(body, object_pairs_hook=_unique)
    except RecursionError:  # not reached past the check above; kept so that no body can answer 500
        raise BodyRefused(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BodyRefused(f"{key!r} appears more than once in the same object", field=key)
        obj[key] = value
    return obj


def _depth(body: bytes) -> int:
    """The deepest nesting of brackets outside strings (an unterminated string counts as text)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
