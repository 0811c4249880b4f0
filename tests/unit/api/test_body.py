"""Request bodies read strictly (pixq/api/body.py): a repeated key and deep nesting are the caller's mistakes,
named, never a 500; brackets and quotes inside strings are text."""

from __future__ import annotations

import json

import pytest
from pixq.api.body import MAX_DEPTH, BodyRefused, loads


def nested(depth: int) -> bytes:
    return b'{"a": ' * (depth - 1) + b"[]" + b"}" * (depth - 1)


def test_a_plain_request_reads_as_json_does() -> None:
    body = json.dumps({"prompt": "a cactus", "seed": 4, "webhook": {"url": "http://h/x", "events": ["failed"]}})
    assert loads(body.encode()) == json.loads(body)


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "", "prompt": "x"}', "prompt"),
    (b'{"webhook": {"url": "http://a/", "url": "http://b/"}}', "url"),  # in a nested object too
    (b'[{"k": 1, "k": 1}]', "k"),
])
def test_a_key_repeated_in_one_object_is_refused_by_name(body: bytes, field: str) -> None:
    with pytest.raises(BodyRefused, match="appears more than once") as refused:
        loads(body)
    assert refused.value.field == field


def test_the_same_key_in_two_objects_is_fine() -> None:
    assert loads(b'[{"k": 1}, {"k": 2}]') == [{"k": 1}, {"k": 2}]


def test_nesting_up_to_the_limit_reads_and_one_more_is_refused() -> None:
    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(BodyRefused, match=f"deeper than {MAX_DEPTH}") as refused:
        loads(nested(MAX_DEPTH + 1))
    assert refused.value.field is None  # the body, not a field


def test_brackets_far_past_the_recursion_limit_are_refused_not_an_error() -> None:
    for body in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5_000):
        with pytest.raises(BodyRefused):
            loads(body)


def test_brackets_and_escaped_quotes_inside_strings_are_text() -> None:
    prompt = '[[[[{{{{ \\" ]]]] ' * MAX_DEPTH
    assert loads(json.dumps({"prompt": prompt}).encode()) == {"prompt": prompt}


def test_what_is_not_json_is_a_value_error_not_a_refusal() -> None:
    for body in (b"", b"{", b'{"prompt": "unterminated', b"nan?", b"\xff"):
        with pytest.raises(ValueError) as error:
            loads(body)
        assert not isinstance(error.value, BodyRefused), body
