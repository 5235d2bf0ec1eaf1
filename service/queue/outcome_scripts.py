"""Lua scripts that end a worker's run of a job: finish, fail, or hand it back (drain).

Each checks the lease first (``owns``, preamble in :mod:`service.queue.lua`), so a stale
worker's outcome changes nothing; finish and fail go through the shared ``finalize``.
"""

from __future__ import annotations

from service.queue.lua import Script

# rest = the encoded images (refs_json = '': stored in Redis) or nothing (refs_json = their
# names in the result store) → 1, or 0 (nothing written) when the lease is stale.
FINISH = Script(
    "finish",
    params=(
        "job_id",
        "worker",
        "lease",
        "now",
        "result_ttl",
        "job_ttl",
        "seeds_json",
        "latency_bounds",
        "format",
        "refs_json",
    ),
    rest="images",
    body=r"""
if not owns(job_id, worker, lease) then return 0 end
local key = K.images(job_id)
redis.call('DEL', key)
local count = #images
if refs_json ~= '' then
  -- Images already in the result store (service.results): keep only their names.
  count = #cjson.decode(refs_json)
  redis.call('HSET', K.job(job_id), 'results', refs_json)
else
  for i, image in ipairs(images) do redis.call('HSET', key, tostring(i - 1), image) end
  if count > 0 then redis.call('EXPIRE', key, result_ttl) end
end
redis.call('HSET', K.job(job_id), 'image_count', count, 'seeds', seeds_json, 'format', format,
  'expires_at', tostring(tonumber(now) + tonumber(result_ttl)))
local created = tonumber(redis.call('HGET', K.job(job_id), 'created_at'))
observe('job_latency_seconds', tonumber(now) - created, latency_bounds)
redis.call('HINCRBY', K.metrics, 'images_generated', count)
finalize(job_id, 'succeeded', now, job_ttl)
return 1
""",
)


FAIL = Script(
    "fail",
    params=("job_id", "worker", "lease", "now", "job_ttl", "code", "message"),
    body=r"""
if not owns(job_id, worker, lease) then return 0 end
redis.call('HSET', K.job(job_id), 'error_code', code, 'error', message)
finalize(job_id, 'failed', now, job_ttl)
return 1
""",
)


# Graceful hand-back (drain): queued again, not an attempt.
RELEASE = Script(
    "release",
    params=("job_id", "worker", "lease", "now"),
    body=r"""
if not owns(job_id, worker, lease) then return 0 end
local job = K.job(job_id)
local v = redis.call('HMGET', job, 'model', 'entry', 'seq', 'qscore', 'priority', 'owner')
redis.call('HINCRBY', job, 'attempt', -1)  -- a drained run is not a failed attempt
redis.call('HSET', job, 'status', 'queued', 'updated_at', now)
redis.call('HDEL', job, 'worker', 'step', 'total', 'eta_s')
redis.call('SREM', K.running, job_id)
redis.call('SREM', K.owner_running(v[6] or ANONYMOUS), job_id)
redis.call('ZADD', K.queued(v[1]), v[4] or v[3], job_id)
park(v[1], v[5], v[2])  -- the next reclaim by any live worker takes it at once
publish_status(job_id, 'queued')
return 1
""",
)
