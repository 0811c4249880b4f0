"""Many jobs at once (``Client.submit_many``): their validation, one shape at a time, and one Lua
script that writes them all.

A batch's requests often differ only in their prompts: the first request of each shape (the same
fields and values but the prompt) is validated in full, the others only for their prompts' own rules
(``JobRequest.with_prompt``); any doubt, and a request is validated in full, so the errors are the
ones ``submit`` gives. The script writes each job exactly as the per-job create script does for a job
without an owner, quota or API key (its hash, queue message, indexes, ``queued`` event), but in one
call: redis-server runs one script, not one per job (``tests/test_client_batch.py`` compares them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from pixq.errors import InvalidRequest
from pixq.records import KEY_PREFIX, NO_OWNER, OWNER_INDEX_PREFIX, QUEUED_KEY
from pixq.schema import JobRequest, parse_request

# KEYS: the queued index, the job index of jobs without an owner, each job's hash, then the queue list
# each job's message goes on. ARGV: retention in seconds, then per job its id, created_at,
# total_steps, request (JSON) and message. Returns 0 when every job was written, or the position
# (from 1) of a job whose id another job has: then nothing is written. Safe to re-run after an
# unknown outcome: a first run wrote every job (one script), with our created_at, and that is done.
# The hash's fields, in their order, are ``records.queued_fields``' for a job without an owner.
# One EXISTS for all the jobs, one ZADD per index and one LPUSH per queue list for the batch (in
# chunks: unpack's limit): the state the per-job script leaves, job after job, with fewer calls.
_CREATE_MANY = """
local retention = tonumber(ARGV[1])
local n = (#KEYS - 2) / 2
if n == 0 then return 0 end
local function in_chunks(command, key, items, first, last)
  local total = 0
  for i = first, last, 4000 do
    local upto = math.min(i + 3999, last)
    if key then total = total + redis.call(command, key, unpack(items, i, upto))
    else total = total + redis.call(command, unpack(items, i, upto)) end
  end
  return total
end
if in_chunks('EXISTS', nil, KEYS, 3, 2 + n) > 0 then
  for j = 1, n do
    local key = KEYS[2 + j]
    if redis.call('EXISTS', key) == 1 and redis.call('HGET', key, 'created_at') ~= ARGV[3 + 5 * (j - 1)] then
      return j
    end
  end
  return 0  -- each one there has our created_at: this call ran before and wrote them all
end
local scored, lists, pushes, latest = {}, {}, {}, -math.huge
for j = 1, n do
  local key, queue, at = KEYS[2 + j], KEYS[2 + n + j], 2 + 5 * (j - 1)
  local id, created = ARGV[at], ARGV[at + 1]
  redis.call('HSET', key, 'id', id, 'state', 'queued', 'created_at', created, 'attempts', '0', 'step', '0',
    'total_steps', ARGV[at + 2], 'cancel_requested', '0', 'batch', '0', 'request', ARGV[at + 3])
  redis.call('EXPIRE', key, ARGV[1])
  local stream = 'pixq:events:' .. id
  redis.call('XADD', stream, 'MAXLEN', '~', '1000', '*', 'type', 'queued', 'step', '0')
  if retention > 0 then redis.call('EXPIRE', stream, ARGV[1]) end
  scored[#scored + 1] = created
  scored[#scored + 1] = id
  if not pushes[queue] then pushes[queue] = {}; lists[#lists + 1] = queue end
  table.insert(pushes[queue], ARGV[at + 4])
  latest = math.max(latest, tonumber(created))
end
for _, queue in ipairs(lists) do in_chunks('LPUSH', queue, pushes[queue], 1, #pushes[queue]) end
in_chunks('ZADD', KEYS[1], scored, 1, #scored)
in_chunks('ZADD', KEYS[2], scored, 1, #scored)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', latest - retention)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""

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


class BatchCreate:
    """Writes many new jobs' records and messages in one script call (all or none)."""

    def __init__(self, conn: redis.Redis, retention_s: int):
        self.retention_s = retention_s
        self.script = conn.register_script(_CREATE_MANY)

    def call(self, jobs: list[tuple[str, JobRequest]], messages: list[tuple[str, str]]) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments for each ``(job_id, request)`` with its ``(queue list, message)``."""
        keys = [QUEUED_KEY, OWNER_INDEX_PREFIX + NO_OWNER, *(KEY_PREFIX + job_id for job_id, _ in jobs)]
        args: list[Any] = [self.retention_s]
        for (job_id, request), (queue, message) in zip(jobs, messages, strict=True):
            keys.append(queue)
            args += (job_id, repr(time.time()), request.num_inference_steps, request.model_dump_json(), message)
        return keys, args

    def create(self, jobs: list[tuple[str, JobRequest]], messages: list[tuple[str, str]]) -> None:
        """Write the jobs; ``RuntimeError`` when a job's id is taken (then nothing is written: never in
        practice, the ids are uuid4s)."""
        keys, args = self.call(jobs, messages)
        taken = self.script(keys=keys, args=args)
        if taken:
            raise RuntimeError(f"submit_many: job {jobs[int(taken) - 1][0]} existed already; nothing written")
