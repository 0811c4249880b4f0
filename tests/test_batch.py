"""submit_many's validation (pixq/batch.py): one full validation per shape gives what validating every
request in full gives, the same requests and the same errors."""

from __future__ import annotations

from typing import Any

import pytest
from pixq.batch import parse_many
from pixq.checkpoints import DEFAULT_MODEL
from pixq.errors import InvalidRequest
from pixq.schema import MAX_PROMPT_CHARS, JobRequest, parse_request

SHAPE = {"width": 512, "height": 768, "seed": 7, "guidance_scale": 3.0}

# After a valid request of each shape, requests of that shape that a full validation refuses, or takes
# with another value: each must come out as ``parse_request`` says.
CASES: list[dict[str, Any]] = [
    {"prompt": "fine", **SHAPE},
    {"prompt": "  \t", **SHAPE},  # blank
    {"prompt": "\u200b\x00", **SHAPE},  # only a format and a control character
    {"prompt": "x" * (MAX_PROMPT_CHARS + 1), **SHAPE},
    {"prompt": "é" * MAX_PROMPT_CHARS, **SHAPE},  # at the limit, not ASCII: fine
    {"prompt": "lone \ud800 surrogate", **SHAPE},
    {"prompt": 42, **SHAPE},
    {"prompt": None, **SHAPE},
    {**SHAPE},  # no prompt
    {"prompt": "one", **SHAPE, "seed": 1},
    {"prompt": "bool", **SHAPE, "seed": True},  # True == 1 to a dict, not to the strict schema
    {"prompt": "float", **SHAPE, "seed": 1.0},
    {"prompt": "zero", **SHAPE, "guidance_scale": 0.0},
    {"prompt": "minus zero", **SHAPE, "guidance_scale": -0.0},
    {"prompt": "nan", **SHAPE, "guidance_scale": float("nan")},
    {"prompt": "nan again", **SHAPE, "guidance_scale": float("nan")},
    {"prompt": "hook", **SHAPE, "webhook": {"url": "https://example.com/h"}},
    {"prompt": "hook", **SHAPE, "webhook": {"url": "ftp://example.com/h"}},
    {"prompt": "unknown field", **SHAPE, "colour": "red"},
]


def _full(item: dict[str, Any]) -> JobRequest | list[tuple[str, str]]:
    try:
        return parse_request({"model_name": DEFAULT_MODEL, **item})
    except InvalidRequest as exc:
        return exc.errors


def _ours(item: dict[str, Any], before: list[dict[str, Any]]) -> JobRequest | list[tuple[str, str]]:
    """``item`` parsed in a batch after ``before`` (valid requests: they warm their shapes), or its errors."""
    try:
        return parse_many([*before, item], DEFAULT_MODEL, lambda _: None)[-1]
    except InvalidRequest as exc:
        return [(field.split(".", 1)[1], message) for field, message in exc.errors
                if field.startswith(f"{len(before)}.")]


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: str(CASES[i].get("prompt", "no prompt"))[:20])
def test_a_request_in_a_batch_is_what_it_is_alone(i: int) -> None:
    item = CASES[i]
    before = [c for c in [*CASES[:i], dict(item, prompt="warms the shape")] if isinstance(_full(c), JobRequest)]
    full, ours = _full(item), _ours(item, before)
    if isinstance(full, JobRequest):
        assert isinstance(ours, JobRequest), ours
        assert ours.model_dump() == full.model_dump()
        assert repr(ours.guidance_scale) == repr(full.guidance_scale)  # -0.0 stays -0.0
        assert ours.model_fields_set == full.model_fields_set
    else:
        assert ours == full


def test_a_batch_names_each_broken_request_by_its_index() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_many(CASES, DEFAULT_MODEL, lambda _: None)
    expected = [(f"{i}.{field}", message) for i, item in enumerate(CASES)
                if not isinstance(errors := _full(item), JobRequest) for field, message in errors]
    assert caught.value.errors == expected


def test_each_request_of_a_shape_gets_its_own_seed_and_prompt() -> None:
    items = [{"prompt": f"p{i}", "width": 512, "height": 512} for i in range(50)]
    parsed = parse_many(items, DEFAULT_MODEL, lambda _: None)
    assert [r.prompt for r in parsed] == [f"p{i}" for i in range(50)]
    assert all(r.seed >= 0 for r in parsed) and len({r.seed for r in parsed}) > 45
    same = parse_many([items[0]] * 3, DEFAULT_MODEL, lambda _: None)
    assert len({r.seed for r in same}) == 3  # one dict three times: three jobs, three drawn seeds
