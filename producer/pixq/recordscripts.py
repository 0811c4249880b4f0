"""The Lua scripts that change a job record in Redis, each one atomic change (pixq.records runs them).

A state change happens only from the states it is allowed from, and its per-job event (SSE) and, for
jobs with a webhook asking for it, its outbox entry are written by the same script: together or not at
all. Kept apart from ``records.py`` (the record's model and the store that calls these) because they
are one language and one concern: what may change, atomically, in the hash and its indexes.

Keys come in as KEYS, or, for the few a script derives from a job id (its event stream, another job's
hash, the outbox), from the constants of ``pixq.jobrecord`` formatted in (``${EVENTS_PREFIX}``): no key
is spelled here. The field names the scripts read and set are ``JobRecord``'s and the hash-only ones
(``jobrecord.CLAIM_FIELD``...); ``tests/unit/test_jobrecord.py`` checks each against the layout.
"""

from __future__ import annotations

import json
from string import Template

from pixq import jobrecord


def _lua_string(text: str) -> str:
    if not text.isascii():
        raise ValueError(f"recordscripts: a non-ASCII constant {text!r}")
    return json.dumps(text)  # an ASCII JSON string is a Lua string literal


_CONSTANTS = {name: _lua_string(str(getattr(jobrecord, name))) for name in (
    "KEY_PREFIX", "EVENTS_PREFIX", "OUTBOX_KEY", "EVENTS_KEPT", "CLAIM_FIELD", "ENDED_BY_FIELD")}


def _lua(text: str) -> str:
    """A script with the layout's constants (``${EVENTS_PREFIX}``, quoted) in place."""
    return Template(text).substitute(_CONSTANTS)


# Lua helpers prepended to every script that changes a job's state: the per-job event stream
# (SSE) and, for jobs with a webhook asking for the event, the outbox entry. One script, one
# atomic change: a state change and its webhook are written together or not at all.
EMIT = _lua("""
local function pixq_append_event(id, event, step, ttl)
  local stream = ${EVENTS_PREFIX} .. id
  redis.call('XADD', stream, 'MAXLEN', '~', ${EVENTS_KEPT}, '*', 'type', event, 'step', step)
  if ttl and ttl > 0 then redis.call('EXPIRE', stream, ttl) end
end
local function pixq_event(job_key, event, step)
  local ttl = nil
  if event ~= 'running' then ttl = redis.call('TTL', job_key) end
  pixq_append_event(redis.call('HGET', job_key, 'id'), event,
    step or redis.call('HGET', job_key, 'step') or '0', ttl)
end
local function pixq_emit(job_key, event)
  pixq_event(job_key, event)
  if event == 'queued' then return end
  local ok, req = pcall(cjson.decode, redis.call('HGET', job_key, 'request') or '{}')
  if not ok or type(req['webhook']) ~= 'table' then return end
  for _, wanted in ipairs(req['webhook']['events'] or {}) do
    if wanted == event then
      redis.call('XADD', ${OUTBOX_KEY}, '*', 'event', event, unpack(redis.call('HGETALL', job_key)))
      return
    end
  end
end
""")

# Whether an API key (its hash's Redis key, '' for none) is live and has this HMAC: a revoked key is
# refused by the same script that would have acted for it (pixq/api/fast.py).
KEY_OK = """
local function pixq_key_ok(key, hmac)
  if key == '' then return true end
  if redis.call('HGET', key, 'hash') ~= hmac then return false end
  local revoked = redis.call('HGET', key, 'revoked_at')
  return (not revoked) or revoked == ''
end
"""

# KEYS[1]: the job hash. ARGV[1]: allowed current states, comma-joined ("*": any).
# ARGV[2..]: field, value pairs to set. Returns {1, old_state} if set, {0, state} if not
# (state false when the job does not exist).
TRANSITION = EMIT + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, false} end
if ARGV[1] ~= '*' then
  local allowed = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == state then allowed = true end
  end
  if not allowed then return {0, state} end
end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
local now_state = redis.call('HGET', KEYS[1], 'state')
if now_state ~= state then pixq_emit(KEYS[1], now_state) end
return {1, state}
"""

# KEYS: the job hash, the queued index, the owner's job index, the owner's in-flight set, the
# queue list its message goes on (or ''), and the submitting API key's hash (or ''). ARGV: retention in
# seconds, job id, created_at, max in flight (0: no quota), the message (pushed with the record: one
# atomic step), the API key's HMAC (checked against the key's record: the API's fast path), field/value
# pairs. Returns 1; 0 when another job has the id; -1 when the owner already has max-in-flight
# unfinished jobs; -2 when the API key is unknown, changed or revoked (nothing written in either case).
# Safe to re-run after an unknown outcome (a retry after a lost reply): the record written by the first
# run has our created_at, and that counts as created.
CREATE = EMIT + KEY_OK + _lua("""
if not pixq_key_ok(KEYS[6], ARGV[6]) then return -2 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'created_at') == ARGV[3] then return 1 end
  return 0
end
local quota = tonumber(ARGV[4])
if quota > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local s = redis.call('HGET', ${KEY_PREFIX} .. id, 'state')
    if not s or s == 'succeeded' or s == 'failed' or s == 'canceled' then redis.call('ZREM', KEYS[4], id) end
  end
  if redis.call('ZCARD', KEYS[4]) >= quota then return -1 end
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if KEYS[5] ~= '' then redis.call('LPUSH', KEYS[5], ARGV[5]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3] - ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[1])
pixq_emit(KEYS[1], 'queued')
return 1
""")

# Shared by claim and reap: a running job whose lease lapsed and that has used all its attempts
# ends failed and goes on the dead list. KEYS: job, lease, running, dead.
# ARGV: job id, now, max attempts, retention, [worker, lease ms].
DEAD_IF_SPENT = """
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[3]) then
  local message = 'worker lost ' .. attempts .. ' times'
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[2],
    'error', cjson.encode({type = 'WorkerLost', message = message}))
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  pixq_emit(KEYS[1], 'failed')
  return {'dead', message}
end
"""

# Take a job to run: a queued one, or a running one whose worker's lease lapsed. KEYS: job, lease,
# running, dead, queued. ARGV[7]: a token drawn for this claim: a re-run of the same claim after an
# unknown outcome finds its own token and answers 'claimed' again (a second delivery has another).
CLAIM = EMIT + _lua("""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then redis.call('ZREM', KEYS[5], ARGV[1]) return {'missing', ''} end
if state == 'running' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder == ARGV[5] and redis.call('HGET', KEYS[1], ${CLAIM_FIELD}) == ARGV[7] then
    return {'claimed', redis.call('HGET', KEYS[1], 'attempts')}
  end
  if holder then return {'busy', holder} end
elseif state ~= 'queued' then
  return {'settled', state}
end
""") + DEAD_IF_SPENT + _lua("""
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[5], 'started_at', ARGV[2], 'step', '0',
  'batch', '0', ${CLAIM_FIELD}, ARGV[7])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
pixq_emit(KEYS[1], 'running')
return {'claimed', tostring(n)}
""")

# A running job whose lease lapsed goes back to queued (the caller sends a new message) or,
# out of attempts, to the dead list. A re-run after an unknown outcome answers 'settled queued'
# and sends nothing; the reconciliation re-sends that job (reaper.py).
REAP = EMIT + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then redis.call('ZREM', KEYS[3], ARGV[1]) return {'gone', ''} end
if state ~= 'running' then redis.call('ZREM', KEYS[3], ARGV[1]) return {'settled', state} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'alive', ''} end
""" + DEAD_IF_SPENT + """
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'step', '0', 'batch', '0')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
pixq_emit(KEYS[1], 'queued')
return {'requeued', ''}
"""

# KEYS: lease. ARGV: worker, lease ms. Extend the lease only while we hold it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: job, lease. ARGV: worker, step[, batch]. Record progress if we still hold the job; answer
# 'cancel' when a cancel was asked for, 'lost' when the job is no longer ours.
PROGRESS = EMIT + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1]
   or redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'lost'
end
local previous = tonumber(redis.call('HGET', KEYS[1], 'step') or '0') or 0
redis.call('HSET', KEYS[1], 'step', ARGV[2])
if ARGV[3] then redis.call('HSET', KEYS[1], 'batch', ARGV[3]) end
-- The worker writes progress every few steps: one event per step done since the last write.
for done = previous + 1, tonumber(ARGV[2]) do pixq_event(KEYS[1], 'running', tostring(done)) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 'cancel' end
return 'ok'
"""

# KEYS: job, lease, running, queued. ARGV: worker, job id, retention, attempts delta, new state, now,
# field/value pairs. End (or give back) a job we hold: set fields, drop the lease and the running
# entry. A re-run after an unknown outcome finds the end it wrote (same state, same claim) and
# answers 1 again.
RELEASE = EMIT + _lua("""
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  if state == ARGV[5] and state ~= 'queued' and redis.call('HGET', KEYS[1], ${ENDED_BY_FIELD}) == ARGV[1] then
    return {1, state}
  end
  return {0, state or false}
end
redis.call('HSET', KEYS[1], ${ENDED_BY_FIELD}, ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[4]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[2])
local now_state = redis.call('HGET', KEYS[1], 'state')
if now_state ~= 'queued' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
else
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[2])
end
if now_state ~= 'running' then pixq_emit(KEYS[1], now_state) end
return {1, 'running'}
""")

# KEYS: job, dead, queued. ARGV: job id, retention, now, then the field/value pairs of a job queued
# again (``jobrecord.CODEC.requeue_fields``: every field not kept back to its default). A failed or
# canceled job goes back to queued with fresh attempts (the caller sends the message). A re-run after
# an unknown outcome finds it queued with no attempt and answers 1 again (one extra message: harmless).
RETRY = EMIT + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' and redis.call('HGET', KEYS[1], 'attempts') == '0' then return {1, state} end
if state ~= 'failed' and state ~= 'canceled' then return {0, state or false} end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
pixq_emit(KEYS[1], 'queued')
return {1, state}
"""

# Many new jobs at once (``Client.submit_many``), each written as CREATE writes a job without an
# owner, quota or API key: its hash, queue message, indexes, ``queued`` event. KEYS: the queued index,
# the job index of jobs without an owner, each job's hash, then the queue list each job's message
# goes on. ARGV (``submitplan.plan_batch``): retention in seconds; k, the names of the k fields whose
# values differ from job to job (among them id and created_at); m, the m field/value items every job
# has; then per job its message and its k values. Returns 0 when every job was written, or the
# position (from 1) of a job whose id another job has: then nothing is written. Safe to re-run after
# an unknown outcome: a first run wrote every job (one script), with our created_at, and that is done.
# One EXISTS for all the jobs, one ZADD per index and one LPUSH per queue list for the batch (in
# chunks: unpack's limit): the state the per-job script leaves, job after job, with fewer calls.
CREATE_MANY = EMIT + """
local retention = tonumber(ARGV[1])
local n = (#KEYS - 2) / 2
if n == 0 then return 0 end
local k = tonumber(ARGV[2])
local m = tonumber(ARGV[3 + k])
local first, per = 4 + k + m, 1 + k
local id_at, created_at = 0, 0
for i = 1, k do
  if ARGV[2 + i] == 'id' then id_at = i elseif ARGV[2 + i] == 'created_at' then created_at = i end
end
local function in_chunks(command, key, items, first_item, last)
  local total = 0
  for i = first_item, last, 4000 do
    local upto = math.min(i + 3999, last)
    if key then total = total + redis.call(command, key, unpack(items, i, upto))
    else total = total + redis.call(command, unpack(items, i, upto)) end
  end
  return total
end
if in_chunks('EXISTS', nil, KEYS, 3, 2 + n) > 0 then
  for j = 1, n do
    local key = KEYS[2 + j]
    local created = ARGV[first + (j - 1) * per + created_at]
    if redis.call('EXISTS', key) == 1 and redis.call('HGET', key, 'created_at') ~= created then return j end
  end
  return 0  -- each one there has our created_at: this call ran before and wrote them all
end
local fields = {}
for i = 1, k do fields[2 * i - 1] = ARGV[2 + i] end
for i = 1, m do fields[2 * k + i] = ARGV[3 + k + i] end
local scored, lists, pushes, latest = {}, {}, {}, -math.huge
for j = 1, n do
  local key, queue, at = KEYS[2 + j], KEYS[2 + n + j], first + (j - 1) * per
  local id, created = ARGV[at + id_at], ARGV[at + created_at]
  for i = 1, k do fields[2 * i] = ARGV[at + i] end
  redis.call('HSET', key, unpack(fields))
  redis.call('EXPIRE', key, ARGV[1])
  pixq_append_event(id, 'queued', '0', retention)
  scored[#scored + 1] = created
  scored[#scored + 1] = id
  if not pushes[queue] then pushes[queue] = {}; lists[#lists + 1] = queue end
  table.insert(pushes[queue], ARGV[at])
  latest = math.max(latest, tonumber(created))
end
for _, queue in ipairs(lists) do in_chunks('LPUSH', queue, pushes[queue], 1, #pushes[queue]) end
in_chunks('ZADD', KEYS[1], scored, 1, #scored)
in_chunks('ZADD', KEYS[2], scored, 1, #scored)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', latest - retention)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""
