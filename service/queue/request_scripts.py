"""Lua scripts behind a client's requests: submitting a job and canceling one.

Both run on the API side (:class:`service.queue.api_side.ApiQueue`); the shared helpers
(``finalize``, the key table ``K``) come from the preamble in :mod:`service.queue.lua`.
"""

from __future__ import annotations

from service.queue.lua import Script
from service.ratelimit import GCRA_LUA

# → {kind, id, status, queue position (-1 = not queued), params_json}; kind: created |
#   existing (idempotent replay) | mismatch (key reused with another body) | full |
#   owner_full (the owner's cap) | rate_limited (position = ms to wait)
# Order: a replay costs nothing; then the rate limit (so hammering a full queue is
# throttled too), the owner's cap, the model's cap. idem_key, webhook: '' = none;
# max_per_owner, rate_per_min: 0 = off.
SUBMIT = Script(
    "submit",
    params=(
        "job_id",
        "model",
        "priority",
        "params_json",
        "digest",
        "now",
        "max_queue",
        "idem_key",
        "idem_ttl",
        "owner",
        "webhook",
        "max_per_owner",
        "rate_per_min",
        "burst",
    ),
    helpers=GCRA_LUA,
    body=r"""
local function describe(kind, id)
  local v = redis.call('HMGET', K.job(id), 'status', 'model', 'params')
  local rank = redis.call('ZRANK', K.queued(v[2]), id)
  return {kind, id, v[1], rank or -1, v[3]}
end
if idem_key ~= '' then
  local existing = redis.call('GET', idem_key)
  if existing then
    local stored = redis.call('HGET', K.job(existing), 'digest')
    if stored then
      if stored ~= digest then return {'mismatch', existing, '', -1, ''} end
      return describe('existing', existing)
    end
  end
end
if tonumber(rate_per_min) > 0 then
  local wait = gcra(K.rate(owner), tonumber(rate_per_min), tonumber(burst))
  if wait > 0 then
    redis.call('HINCRBY', K.metrics, 'submits_rate_limited', 1)
    return {'rate_limited', '', '', wait, ''}
  end
end
local cap, mine = tonumber(max_per_owner), K.owner_active(owner)
if cap > 0 and redis.call('SCARD', mine) >= cap then
  -- Self-heal: drop ids whose job is gone or final (e.g. a record lost to eviction).
  for _, j in ipairs(redis.call('SMEMBERS', mine)) do
    local st = redis.call('HGET', K.job(j), 'status')
    if st ~= 'queued' and st ~= 'running' then redis.call('SREM', mine, j) end
  end
  if redis.call('SCARD', mine) >= cap then
    redis.call('HINCRBY', K.metrics, 'submits_refused_owner_cap', 1)
    return {'owner_full', '', '', -1, ''}
  end
end
if redis.call('ZCARD', K.queued(model)) >= tonumber(max_queue) then return {'full', '', '', -1, ''} end
local seq = redis.call('INCR', K.seq)
-- Queue order: priority first, then submit order (positions count higher priorities too).
local score = string.format('%d', PRIORITY_RANK[priority] * 1000000000000 + seq)
local entry = redis.call('XADD', stream_of(model, priority), '*', 'job', job_id)
redis.call('HSET', K.job(job_id), 'id', job_id, 'status', 'queued', 'model', model,
  'params', params_json, 'digest', digest, 'created_at', now, 'updated_at', now,
  'entry', entry, 'seq', seq, 'qscore', score, 'priority', priority, 'attempt', 0,
  'lease', 0, 'owner', owner)
if webhook ~= '' then redis.call('HSET', K.job(job_id), 'webhook', webhook) end
redis.call('SADD', mine, job_id)
redis.call('ZADD', K.queued(model), score, job_id)
redis.call('SADD', K.models, model)
redis.call('HINCRBY', K.metrics, 'jobs_submitted', 1)
if idem_key ~= '' then redis.call('SET', idem_key, job_id, 'EX', idem_ttl) end
-- The owner's job index for GET /v1/jobs (service.job_index): newest by seq, bounded,
-- expiring with the jobs it lists when the owner stops submitting.
local owner_jobs = K.owner_jobs(owner)
redis.call('ZADD', owner_jobs, seq, job_id)
redis.call('ZREMRANGEBYRANK', owner_jobs, 0, -10001)
redis.call('EXPIRE', owner_jobs, 2 * tonumber(idem_ttl))
return describe('created', job_id)
""",
)


# owner: '' = any → 'missing' (unknown, or another owner's) | 'canceled' | <terminal status>
CANCEL = Script(
    "cancel",
    params=("job_id", "now", "job_ttl", "owner"),
    body=r"""
local v = redis.call('HMGET', K.job(job_id), 'status', 'owner')
local st = v[1]
if not st then return 'missing' end
if owner ~= '' and owner ~= (v[2] or ANONYMOUS) then return 'missing' end
if st ~= 'queued' and st ~= 'running' then return st end
finalize(job_id, 'canceled', now, job_ttl)
return 'canceled'
""",
)
