"""Property tests of the request schema: any input is either a valid request or one clear refusal."""

from __future__ import annotations

import json
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from pixq.checkpoints import KNOWN_MODELS
from pixq.errors import InvalidRequest
from pixq.schema import MAX_PROMPT_CHARS, JobRequest, parse_request

FIELDS = set(JobRequest.model_fields)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)

valid_requests = st.fixed_dictionaries(
    # Not blank: a character other than white space, control (Cc) and format (Cf) characters.
    {"prompt": st.text(min_size=1, max_size=300).filter(
        lambda s: any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in s))},
    optional={
        "negative_prompt": st.text(max_size=100),
        "num_inference_steps": st.integers(1, 200),
        "guidance_scale": st.floats(0, 50, allow_nan=False),
        "seed": st.integers(-1, 2**32 - 1),
        "width": st.integers(8, 256).map(lambda n: n * 8),
        "height": st.integers(8, 256).map(lambda n: n * 8),
        "num_images_per_prompt": st.integers(1, 4),
        "model_name": st.sampled_from(sorted(KNOWN_MODELS)),
        "output_format": st.sampled_from(["png", "webp", "jpeg"]),
        "priority": st.integers(0, 9),
        "mode": st.sampled_from(["exact", "fast"]),
    },
).filter(lambda d: d.get("seed", -1) + d.get("num_images_per_prompt", 1) - 1 <= 2**32 - 1)  # every image's seed


@settings(max_examples=300, deadline=None)
@given(valid_requests)
def test_valid_requests_parse_and_survive_the_wire(data: dict) -> None:
    model = data.get("model_name", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    too_big = {"PixArt-alpha/PixArt-Sigma-XL-2-512-MS": 1024}.get(model, 10**9)
    if max(data.get("width", 1024), data.get("height", 1024)) > too_big:
        return
    request = parse_request(data)
    again = JobRequest.model_validate_json(request.model_dump_json())
    assert again == request
    assert request.with_seed().seed >= 0


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=12), json_values, max_size=8))
def test_any_json_object_is_a_request_or_a_refusal_naming_fields(data: dict) -> None:
    try:
        parse_request(data)
    except InvalidRequest as exc:
        assert exc.errors, "a refusal names at least one field"
        for field, message in exc.errors:
            # A nested object's rule names its path (webhook.url).
            named = field in set(data) or field.split(".")[0] in FIELDS | set(data)
            assert named or (field == '""' and "" in data), field
            assert message
        assert str(exc) == "; ".join(f"{f}: {m}" for f, m in exc.errors)
    # No other exception type ever escapes.


@settings(max_examples=100, deadline=None)
@given(st.integers(MAX_PROMPT_CHARS + 1, MAX_PROMPT_CHARS * 4))
def test_oversized_prompts_are_refused(length: int) -> None:
    try:
        parse_request({"prompt": "a" * length})
    except InvalidRequest as exc:
        assert [f for f, _ in exc.errors] == ["prompt"]
        assert f"at most {MAX_PROMPT_CHARS}" in exc.errors[0][1]
    else:
        raise AssertionError("an oversized prompt was accepted")


@settings(max_examples=200, deadline=None)
@given(st.integers(-10_000, 10_000).filter(lambda n: n % 8))
def test_sizes_off_the_grid_of_8_are_refused(side: int) -> None:
    for field in ("width", "height"):
        try:
            parse_request({"prompt": "x", field: side})
        except InvalidRequest as exc:
            assert field in dict(exc.errors)
        else:
            raise AssertionError(f"{field}={side} accepted")


def test_schema_is_json_serialisable() -> None:
    schema = JobRequest.model_json_schema()
    assert json.loads(json.dumps(schema)) == schema and set(schema["properties"]) == set(JobRequest.model_fields)
