"""The job record's layout has one owner (pixq/jobrecord.py): the hash's fields come from ``JobRecord``'s
annotations, the Lua scripts take their keys from its constants, and a submit is planned without Redis
(pixq/submitplan.py). No Redis here; tests/test_submit_paths.py compares the three submit paths on one."""

from __future__ import annotations

import re

import pytest
from pixq import jobrecord, recordscripts
from pixq.errors import QueueFull, QuotaExceeded
from pixq.jobrecord import CODEC, ImageRecord, JobError, JobRecord, JobState, RecordCodec, RenderInfo
from pixq.schema import JobRequest, RenderMode, parse_request
from pixq.submitplan import KeyRefused, check_depth, plan_batch, plan_submit

REQUEST = parse_request({"model_name": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "prompt": "a cactus", "seed": 4,
                         "num_inference_steps": 7, "webhook": {"url": "http://127.0.0.1:9/h", "events": ["failed"]}})


def _hash(flat: list[str]) -> dict[bytes, bytes]:
    """What HGETALL answers for fields written as ``flat`` (name, value, name, value...)."""
    return {k.encode(): v.encode() for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _full_record() -> JobRecord:
    image = ImageRecord(index=0, bucket="b", key="k.png", width=64, height=64, seed=4, content_type="image/png",
                        size_bytes=10, sha256="0" * 64)
    render = RenderInfo(mode=RenderMode.exact, width=64, height=64, resized=False, vae_tiled=False,
                        transformer_rows_per_image=2, render_s=0.5, batch_id="x")
    return JobRecord(id="a" * 32, state=JobState.succeeded, request=REQUEST, created_at=1.5, started_at=2.25,
                     finished_at=3.0, attempts=2, worker="w1", step=7, total_steps=7, images=[image], render=render,
                     error=JobError(type="T", message="m"), cancel_requested=True, owner="k1", batch=3)


def test_every_field_of_a_record_reads_back_as_written() -> None:
    record = _full_record()
    assert set(CODEC.encode(record)[::2]) == set(JobRecord.model_fields)  # every field set is written
    assert CODEC.decode(_hash(CODEC.encode(record))) == record
    # The hash-only fields (a claim's token...) are not the record's; empty fields read as their defaults.
    extra = ["claim", "t", "ended_by", "w1", "sent_at", "9", "worker", "", "owner", "", "images", ""]
    plain = CODEC.decode(_hash([*CODEC.encode(record.model_copy(update={"worker": None, "owner": None,
                                                                         "images": []})), *extra]))
    assert plain == record.model_copy(update={"worker": None, "owner": None, "images": []})
    with pytest.raises(KeyError, match="state"):
        CODEC.decode({b"id": b"x"})


@pytest.mark.parametrize("owner", [None, "k1"])
def test_a_new_records_fields_are_the_record_encoded(owner: str | None) -> None:
    plan = plan_submit(REQUEST, retention_s=60, owner=owner, job_id="c" * 32, now=12.5)
    fields = plan.args[6:]
    assert _hash(fields) == _hash(CODEC.encode(plan.record()))
    assert CODEC.decode(_hash(fields)) == plan.record()
    assert plan.record().state is JobState.queued and plan.record().total_steps == 7


def test_a_field_added_to_the_model_is_written_read_and_reset_with_no_other_edit() -> None:
    class Tagged(JobRecord):  # what one edit of JobRecord makes
        tag: str = "plain"
        weight: float | None = None
        labels: list[int] = []
        urgent: bool = False

    codec = RecordCodec(Tagged)
    new = _hash(codec.new_fields("d" * 32, REQUEST, 5.0))
    assert new[b"tag"] == b"plain" and new[b"urgent"] == b"0"
    assert b"weight" not in new and b"labels" not in new  # empty defaults are not written
    record = Tagged(**{**codec.decode(new).model_dump(), "state": JobState.failed, "tag": "x", "weight": 0.5,
                       "labels": [1, 2], "urgent": True})
    assert codec.decode(_hash(codec.encode(record))) == record
    reset = _hash(codec.requeue_fields())
    assert reset[b"tag"] == b"plain" and reset[b"weight"] == b"" and reset[b"labels"] == b"[]"
    assert reset[b"state"] == b"queued"


def test_a_retried_job_gets_every_field_but_the_kept_ones_back() -> None:
    reset = _hash(CODEC.requeue_fields())
    assert {k.decode() for k in reset} == set(JobRecord.model_fields) - jobrecord.KEPT_ON_RETRY
    retried = CODEC.decode({**_hash(CODEC.encode(_full_record())), **reset})
    fresh = plan_submit(REQUEST, retention_s=60, owner="k1", job_id="a" * 32, now=1.5).record()
    assert retried == fresh


SCRIPTS = {name: getattr(recordscripts, name) for name in
           ("TRANSITION", "CREATE", "CREATE_MANY", "CLAIM", "REAP", "RENEW", "PROGRESS", "RELEASE", "RETRY")}


def _hset_names(script: str) -> list[str]:
    """The literal field names of every ``HSET`` in ``script`` (every other argument after the key)."""
    names = []
    for start in [m.end() for m in re.finditer(r"redis\.call\('HSET', ", script)]:
        args, depth, token = [], 0, ""
        for ch in script[start:]:
            if ch in "({":
                depth += 1
            elif ch in ")}":
                if depth == 0:
                    break
                depth -= 1
            if ch == "," and depth == 0:
                args.append(token.strip())
                token = ""
            else:
                token += ch
        args.append(token.strip())
        names += [a.strip("'\"") for a in args[1::2] if a[:1] in "'\""]
    return names


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_scripts_spell_no_key_and_only_the_records_field_names(name: str) -> None:
    script = SCRIPTS[name].replace(recordscripts.KEY_OK, "")  # KEY_OK reads an API key's hash, not a job's
    assert "pixq:" not in script.replace(jobrecord.EVENTS_PREFIX, "").replace(jobrecord.KEY_PREFIX, "").replace(
        jobrecord.OUTBOX_KEY, ""), "a key spelled in the script: pass it as KEYS or format it from jobrecord"
    assert "${" not in script
    known = set(JobRecord.model_fields) | {jobrecord.CLAIM_FIELD, jobrecord.ENDED_BY_FIELD, jobrecord.SENT_AT_FIELD}
    read = re.findall(r"'(?:HGET|HINCRBY)', [^,]+, ['\"](\w+)['\"]", script)
    assert set(read) | set(_hset_names(script)) <= known
    for prefix in ("KEY_PREFIX", "EVENTS_PREFIX", "OUTBOX_KEY"):  # formatted in, where a script derives one
        assert getattr(jobrecord, prefix) not in SCRIPTS[name] or f'"{getattr(jobrecord, prefix)}"' in SCRIPTS[name]


def test_the_emit_helpers_take_their_keys_from_the_layout() -> None:
    assert f'"{jobrecord.EVENTS_PREFIX}" .. id' in recordscripts.EMIT
    assert f"'XADD', \"{jobrecord.OUTBOX_KEY}\"" in recordscripts.EMIT
    assert _hset_names(recordscripts.CLAIM).count(jobrecord.CLAIM_FIELD) == 1


def test_a_plan_is_made_without_redis() -> None:
    request = REQUEST.model_copy(update={"idempotency_key": "k-1", "seed": -1})  # -1: draw one
    plan = plan_submit(request, retention_s=60, owner="k1", max_in_flight=2, api_key=("pixq:apikey:k1", "hmac"),
                       job_id="e" * 32, now=3.0)
    assert plan.request.seed >= 0  # the seed is drawn in the plan
    assert plan.idem_key == "pixq:idem:k1/k-1" and plan.undo_keys == ["pixq:job:" + "e" * 32, "pixq:idem:k1/k-1"]
    assert plan.keys == ["pixq:job:" + "e" * 32, "pixq:queued", "pixq:owner-jobs:k1", "pixq:owner-inflight:k1", "",
                         "pixq:apikey:k1"]
    assert plan.args[:6] == [60, "e" * 32, "3.0", 2, "", "hmac"]
    assert plan_submit(request, retention_s=60, job_id="e" * 32).idem_key == "pixq:idem:k-1"
    assert plan.earlier_job(None) is None and plan.earlier_job(b"e" * 32) is None  # expired, or ours
    assert plan.earlier_job(b"f" * 32) == "f" * 32
    plan.check_created(1)
    for answer, error in ((-1, QuotaExceeded), (-2, KeyRefused), (0, ValueError)):
        with pytest.raises(error):
            plan.check_created(answer)


def test_depth_limits() -> None:
    check_depth("m", 4, 5)
    check_depth("m", 99, 0)  # no limit
    with pytest.raises(QueueFull, match="holds 5 jobs or more"):
        check_depth("m", 5, 5)
    with pytest.raises(QueueFull, match="would pass 5"):
        check_depth("m", 3, 5, adding=3)


class _Templates:
    """Stands in for MessageTemplates (Celery-free): one queue, the job id as the message."""

    def messages(self, jobs: list[tuple[str, JobRequest]]) -> list[tuple[str, str]]:
        return [("q", f"message of {job_id}") for job_id, _ in jobs]


def test_a_batch_plan_carries_each_jobs_new_fields() -> None:
    plan = plan_batch([REQUEST, REQUEST], retention_s=60, templates=_Templates())  # type: ignore[arg-type]
    assert len(plan.job_ids) == 2 and plan.keys[2:] == [f"pixq:job:{i}" for i in plan.job_ids] + ["q", "q"]
    args = plan.args
    k = args[1]
    names, m = args[2:2 + k], args[2 + k]
    fixed, at = args[3 + k:3 + k + m], 3 + k + m
    for job_id in plan.job_ids:
        assert args[at] == f"message of {job_id}"
        values = dict(zip(names, args[at + 1:at + 1 + k], strict=True))
        fields = [x for pair in values.items() for x in pair] + fixed
        assert _hash(fields) == _hash(CODEC.new_fields(job_id, REQUEST, float(values["created_at"])))
        at += 1 + k
    assert at == len(args)
