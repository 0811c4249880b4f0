"""The request schema's rules, and the settings contract (plain unit tests)."""

from __future__ import annotations

import pytest
from pixq.checkpoints import DEFAULT_MODEL
from pixq.errors import ConfigError, InvalidRequest
from pixq.schema import FAST_SCHEDULERS, MAX_SEED, JobRequest, Scheduler, parse_request, request_schema
from pixq.settings import Settings

# (request fields, field named in the error, words of the rule)
INVALID = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "   \n"}, "prompt", "must not be empty"),
    ({}, "prompt", "is required"),
    ({"prompt": "x" * 4001}, "prompt", "at most 4000"),
    ({"prompt": "x", "width": 1001}, "width", "multiple of 8"),
    ({"prompt": "x", "height": 1020}, "height", "multiple of 8"),
    ({"prompt": "x", "width": 2056}, "width", "at most 2048"),
    ({"prompt": "x", "model_name": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "height": 1032}, "height", "at most 1024"),
    ({"prompt": "x", "width": 32}, "width", "greater than or equal to 64"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ({"prompt": "x", "num_inference_steps": -5}, "num_inference_steps", "greater than or equal to 1"),
    ({"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps", "less than or equal to 200"),
    ({"prompt": "x", "guidance_scale": -0.5}, "guidance_scale", "greater than or equal to 0"),
    ({"prompt": "x", "num_images_per_prompt": 5}, "num_images_per_prompt", "less than or equal to 4"),
    ({"prompt": "x", "num_images_per_prompt": 0}, "num_images_per_prompt", "greater than or equal to 1"),
    ({"prompt": "x", "model_name": "stabilityai/sdxl"}, "model_name", "unknown model"),
    ({"prompt": "x", "model_name": "relative/dir"}, "model_name", "unknown model"),
    ({"prompt": "x", "width": "512"}, "width", "valid integer"),
    ({"prompt": "x", "num_inference_steps": 20.5}, "num_inference_steps", "valid integer"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale", "valid number"),
    ({"prompt": 42}, "prompt", "valid string"),
    ({"prompt": "x", "seed": -2}, "seed", "greater than or equal to -1"),
    ({"prompt": "x", "seed": 2**40}, "seed", f"less than or equal to {MAX_SEED}"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "'png', 'webp' or 'jpeg'"),
    ({"prompt": "x", "mode": "turbo"}, "mode", "'exact' or 'fast'"),
    ({"prompt": "x", "scheduler": "heun"}, "scheduler",
     "'dpm-solver++', 'sa-solver', 'unipc', 'euler', 'euler-ancestral' or 'ddim'"),
    ({"prompt": "x", "scheduler": "DPM-Solver"}, "scheduler", "'dpm-solver++', 'sa-solver'"),
    ({"prompt": "x", "scheduler": "euler", "num_inference_steps": 1}, "scheduler",
     "euler needs at least 2 num_inference_steps (got 1); with 1 use one of dpm-solver++, sa-solver, unipc, ddim"),
    ({"prompt": "x", "scheduler": "euler-ancestral", "num_inference_steps": 1}, "scheduler", "at least 2"),
    ({"prompt": "x", "scheduler": "sa-solver", "mode": "fast"}, "scheduler",
     "sa-solver cannot run mode fast (fast mode is measured with dpm-solver++ only); with mode fast use one of "
     "dpm-solver++, or mode exact"),
    ({"prompt": "x", "scheduler": "ddim", "mode": "fast"}, "scheduler", "ddim cannot run mode fast"),
    ({"prompt": "x", "steps": 20}, "steps", "unknown field"),
    ({"prompt": "x", "width": 1000, "use_resolution_binning": False}, "width",
     "multiple of 16 when use_resolution_binning is false"),
    ({"prompt": "x", "use_resolution_binning": "no"}, "use_resolution_binning", "valid boolean"),
    ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale", "finite number"),
    ({"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale", "finite number"),
    ({"prompt": "x", "guidance_scale": float("-inf")}, "guidance_scale", "finite number"),
    ({"prompt": "\x00\x00\x00"}, "prompt", "must not be empty or blank"),
    ({"prompt": "\x1b\u200b\t\u3000\x7f\r"}, "prompt", "must not be empty or blank"),
    ({"prompt": "x", "seed": MAX_SEED, "num_images_per_prompt": 4}, "seed",
     f"must be at most {MAX_SEED - 3} with num_images_per_prompt 4"),
    ({"prompt": "x", "seed": MAX_SEED - 1, "num_images_per_prompt": 3}, "seed", f"must be at most {MAX_SEED - 2}"),
    ({"prompt": "x", "model_name": "/models/" + "m" * 600}, "model_name", "at most 512 characters"),
    ({"prompt": "x", "model_name": "/models/a:1"}, "model_name", "may hold only"),
    ({"prompt": "x", "model_name": "/models/my model"}, "model_name", "may hold only"),
    ({"prompt": "x", "model_name": "/models//pixart"}, "model_name", "may hold only"),
    ({"prompt": "x", "model_name": "/models/../etc"}, "model_name", "must not contain . or .."),
]


@pytest.mark.parametrize(("fields", "field", "rule"), INVALID, ids=[f"{c[1]}-{c[2]}" for c in INVALID])
def test_invalid_request_names_field_and_rule(fields: dict, field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(fields)
    assert (field, ) == tuple(f for f, m in info.value.errors if f == field)[:1]
    message = dict(info.value.errors)[field]
    assert rule in message, message
    assert str(info.value).startswith(f"{field}: ") or f"; {field}: " in str(info.value)


def test_several_broken_rules_are_reported_together() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request({"prompt": "x", "width": 1001, "num_inference_steps": 0})
    assert {f for f, _ in info.value.errors} == {"width", "num_inference_steps"}


def test_defaults_follow_diffusers_and_dashai() -> None:
    r = parse_request({"prompt": "a cat"})
    assert (r.negative_prompt, r.num_inference_steps, r.guidance_scale, r.seed) == ("", 20, 4.5, -1)
    assert (r.width, r.height, r.num_images_per_prompt, r.model_name) == (1024, 1024, 1, DEFAULT_MODEL)
    assert r.output_format.value == "png" and r.mode.value == "exact"
    assert r.use_resolution_binning is True  # diffusers' default: the trained size nearest, resized
    assert r.scheduler is Scheduler.dpm_solver  # the checkpoint's own sampler


def test_every_sampler_runs_exact_mode_from_two_steps_and_fast_mode_only_where_measured() -> None:
    for scheduler in Scheduler:
        assert parse_request({"prompt": "x", "scheduler": scheduler.value, "num_inference_steps": 2}).scheduler \
            is scheduler
        fast = {"prompt": "x", "scheduler": scheduler.value, "mode": "fast"}
        if scheduler in FAST_SCHEDULERS:
            assert parse_request(fast).mode.value == "fast"
        else:
            with pytest.raises(InvalidRequest, match="^scheduler: "):
                parse_request(fast)
    assert parse_request({"prompt": "x", "scheduler": "sa-solver", "num_inference_steps": 1}).num_inference_steps == 1
    with pytest.raises(InvalidRequest) as info:  # both of the sampler's rules, in one error
        parse_request({"prompt": "x", "scheduler": "euler", "num_inference_steps": 1, "mode": "fast"})
    assert [f for f, _ in info.value.errors] == ["scheduler", "scheduler"]


def test_the_cli_offers_the_schemas_samplers() -> None:
    import typing

    from pixq import commands

    assert typing.get_args(commands.SchedulerChoice) == tuple(s.value for s in Scheduler)


def test_native_size_needs_multiples_of_16_only_without_binning() -> None:
    assert parse_request({"prompt": "x", "width": 1000, "height": 600}).width == 1000  # binned: any multiple of 8
    native = parse_request({"prompt": "x", "width": 1008, "height": 592, "use_resolution_binning": False})
    assert (native.width, native.height, native.use_resolution_binning) == (1008, 592, False)


def test_seeds_of_every_image_stay_in_range_and_visible_prompts_pass() -> None:
    last = parse_request({"prompt": "x", "seed": MAX_SEED - 3, "num_images_per_prompt": 4})
    assert last.image_seeds()[-1] == MAX_SEED
    assert parse_request({"prompt": "x", "seed": MAX_SEED}).image_seeds() == [MAX_SEED]
    assert parse_request({"prompt": "\x00 a cat\n"}).prompt == "\x00 a cat\n"  # one visible character is enough
    assert parse_request({"prompt": "猫"}).prompt == "猫"


def test_local_directories_and_known_checkpoints_are_valid() -> None:
    assert parse_request({"prompt": "x", "model_name": "/models/pixart"}).model_name == "/models/pixart"
    assert parse_request({"prompt": "x", "model_name": "/m/PixArt-Σ.v2_1+a@b"}).model_name
    big = parse_request({"prompt": "x", "model_name": "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", "width": 4096})
    assert big.width == 4096


def test_random_seed_is_drawn_and_image_seeds_follow() -> None:
    r = parse_request({"prompt": "x", "num_images_per_prompt": 3}).with_seed()
    assert 0 <= r.seed <= MAX_SEED
    assert r.image_seeds() == [r.seed, r.seed + 1, r.seed + 2]
    fixed = parse_request({"prompt": "x", "seed": 7})
    assert fixed.with_seed().seed == 7


def test_schema_describes_every_field() -> None:
    schema = request_schema()
    assert schema["required"] == ["prompt"]
    assert set(schema["properties"]) == set(JobRequest.model_fields)
    assert schema["properties"]["num_inference_steps"]["default"] == 20
    assert schema["properties"]["scheduler"]["default"] == "dpm-solver++"
    assert schema["$defs"]["Scheduler"]["enum"] == [s.value for s in Scheduler]
    assert schema["additionalProperties"] is False


def test_settings_read_the_contract_variables() -> None:
    s = Settings.from_env(
        {
            "PIXQ_REDIS_URL": "rediss://user:pw@redis.example:6380/2?ssl_cert_reqs=required",
            "PIXQ_S3_ENDPOINT_URL": "https://s3.example",
            "PIXQ_S3_BUCKET": "my-images",
            "PIXQ_S3_PREFIX": "/renders/v1/",
            "PIXQ_MODEL": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )
    assert s.s3_prefix == "renders/v1" and s.aws_region == "eu-west-1"
    assert s.describe()["redis_url"] == "rediss://user:***@redis.example:6380/2?ssl_cert_reqs=required"


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("PIXQ_REDIS_URL", "http://x", "must start with redis://"),
        ("PIXQ_REDIS_URL", "redis://:pw@host:notaport/0", "malformed"),
        ("PIXQ_REDIS_URL", "redis://:pw@host:99999/0", "malformed"),
        ("PIXQ_REDIS_URL", "redis://:pw@[::1:6379/0", "malformed (Invalid IPv6 URL)"),
        ("PIXQ_REDIS_URL", "redis://:pw@host:6379/0?socket_timeout=abc", "socket_timeout"),
        ("PIXQ_REDIS_URL", "redis://:pw@host:6379/0?no_such_option=1", "no_such_option"),
        ("PIXQ_REDIS_URL", "redis://:pw@host:6379/zero", "the path is the database number"),
        ("PIXQ_MODEL", "/models/a:b", "may hold only"),
        ("PIXQ_REDIS_URL", "rediss://:pw@host:6380/0", "ssl_cert_reqs=required"),
        ("PIXQ_S3_ENDPOINT_URL", "s3.example", "http:// or https://"),
        ("PIXQ_S3_BUCKET", "Bad_Bucket", "not a valid S3 bucket name"),
        ("PIXQ_S3_PREFIX", "a b", "may hold only"),
        ("PIXQ_MODEL", "foo/bar", "unknown model"),
        ("PIXQ_RETENTION_S", "soon", "not an integer"),
        ("PIXQ_MAX_QUEUE_DEPTH", "-1", "at least 0"),
    ],
)
def test_malformed_settings_name_the_variable(var: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert str(info.value).startswith(var) and words in str(info.value)
    assert "pw@" not in str(info.value)


def test_missing_settings_say_what_to_set() -> None:
    s = Settings.from_env({})
    with pytest.raises(ConfigError, match="PIXQ_REDIS_URL is not set"):
        s.require_redis()
    with pytest.raises(ConfigError, match="PIXQ_S3_BUCKET is not set"):
        s.require_bucket()
