"""Lua scripts behind :mod:`service.queue`: every multi-key state change is one atomic script.

Why Lua and not MULTI: the changes are conditional (is the job still queued? does this
worker still own it?), and a check followed by a write must not interleave with a cancel
or a reclaim. Every script takes the key prefix as ``ARGV[1]`` and derives key names from
it with the helpers in ``_PREAMBLE``, which mirror :class:`service.queue.keys.Keys`
(a single Redis, not Cluster: keys are computed inside the scripts).
"""

from __future__ import annotations

from service.ratelimit import GCRA_LUA

_PREAMBLE = r"""
redis.replicate_commands()
local P = ARGV[1]
local GROUP = 'workers'
local RUNNING = P .. ':running'
local METRICS = P .. ':metrics'
local function job_key(id) return P .. ':job:' .. id end
local function images_key(id) return P .. ':job:' .. id .. ':images' end
local function channel(id) return P .. ':job:' .. id .. ':events' end
local function stream_key(m) return P .. ':model:' .. m .. ':stream' end
local function queued_key(m) return P .. ':model:' .. m .. ':queued' end
local function worker_key(w) return P .. ':worker:' .. w end
local function owner_key(o) return P .. ':owner:' .. o .. ':active' end
local WEBHOOKS = P .. ':webhooks'

local function observe(name, value, bounds)
  local le = '+Inf'
  for b in string.gmatch(bounds, '[^,]+') do
    if value <= tonumber(b) then le = b; break end
  end
  redis.call('HINCRBY', METRICS, name .. '_bucket:' .. le, 1)
  redis.call('HINCRBYFLOAT', METRICS, name .. '_sum', tostring(value))
  redis.call('HINCRBY', METRICS, name .. '_count', 1)
end

local function retire(model, entry)
  redis.call('XACK', stream_key(model), GROUP, entry)
  redis.call('XDEL', stream_key(model), entry)
end

local function publish_status(id, status)
  redis.call('PUBLISH', channel(id), '{"type":"status","id":"' .. id .. '","status":"' .. status .. '"}')
end

-- Terminal transition shared by finish / fail / cancel / give-up: the entry leaves the
-- stream, the job leaves the live sets, the record starts its countdown, and a job with
-- a webhook gets its delivery queued in the same atomic step (service.webhook_dispatch).
local function finalize(id, status, now, job_ttl)
  local job = job_key(id)
  local v = redis.call('HMGET', job, 'model', 'entry', 'owner', 'webhook')
  redis.call('HSET', job, 'status', status, 'finished_at', now, 'updated_at', now)
  redis.call('HDEL', job, 'eta_s')
  redis.call('SREM', RUNNING, id)
  redis.call('ZREM', queued_key(v[1]), id)
  retire(v[1], v[2])
  redis.call('SREM', owner_key(v[3] or 'anonymous'), id)
  if v[4] and v[4] ~= '' then
    local e = redis.call('HMGET', job, 'error_code', 'error', 'image_count')
    redis.call('XADD', WEBHOOKS, '*', 'job', id, 'status', status, 'url', v[4],
      'attempt', '1', 'error_code', e[1] or '', 'error', e[2] or '', 'images', e[3] or '0',
      'finished_at', now)
  end
  redis.call('EXPIRE', job, job_ttl)
  redis.call('HINCRBY', METRICS, 'jobs_' .. status, 1)
  publish_status(id, status)
end

-- Start (or restart) a run of a job for a worker; returns the claim tuple.
local function start_run(id, worker, now)
  local job = job_key(id)
  local attempt = redis.call('HINCRBY', job, 'attempt', 1)
  local lease = redis.call('HINCRBY', job, 'lease', 1)
  redis.call('HSET', job, 'status', 'running', 'worker', worker, 'started_at', now, 'updated_at', now)
  redis.call('HDEL', job, 'step', 'total', 'eta_s')
  local v = redis.call('HMGET', job, 'model', 'params', 'entry')
  redis.call('ZREM', queued_key(v[1]), id)
  redis.call('SADD', RUNNING, id)
  publish_status(id, 'running')
  return {id, tostring(lease), tostring(attempt), v[2], v[3]}
end

local function owns(id, worker, lease)
  local v = redis.call('HMGET', job_key(id), 'status', 'worker', 'lease')
  return v[1] == 'running' and v[2] == worker and v[3] == lease
end
"""

# ARGV: prefix, job_id, model, params_json, digest, now, max_queue, idem_key ('' = none),
#       idem_ttl, owner, webhook_url ('' = none), max_per_owner (0 = off),
#       rate_per_min (0 = off), burst
# → {kind, id, status, queue position (-1 = not queued), params_json}; kind: created |
#   existing (idempotent replay) | mismatch (key reused with another body) | full |
#   owner_full (the owner's cap) | rate_limited (position = ms to wait)
# Order: a replay costs nothing; then the rate limit (so hammering a full queue is
# throttled too), the owner's cap, the model's cap.
SUBMIT = (
    _PREAMBLE
    + GCRA_LUA
    + r"""
local id, model, now = ARGV[2], ARGV[3], ARGV[6]
local idem, owner, webhook = ARGV[8], ARGV[10], ARGV[11]
local per_owner, per_min = tonumber(ARGV[12]), tonumber(ARGV[13])
local function describe(kind, job_id)
  local v = redis.call('HMGET', job_key(job_id), 'status', 'model', 'params')
  local rank = redis.call('ZRANK', queued_key(v[2]), job_id)
  return {kind, job_id, v[1], rank or -1, v[3]}
end
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then
    local digest = redis.call('HGET', job_key(existing), 'digest')
    if digest then
      if digest ~= ARGV[5] then return {'mismatch', existing, '', -1, ''} end
      return describe('existing', existing)
    end
  end
end
if per_min > 0 then
  local wait = gcra(P .. ':rate:' .. owner, per_min, tonumber(ARGV[14]))
  if wait > 0 then
    redis.call('HINCRBY', METRICS, 'submits_rate_limited', 1)
    return {'rate_limited', '', '', wait, ''}
  end
end
if per_owner > 0 and redis.call('SCARD', owner_key(owner)) >= per_owner then
  -- Self-heal: drop ids whose job is gone or final (e.g. a record lost to eviction).
  for _, j in ipairs(redis.call('SMEMBERS', owner_key(owner))) do
    local st = redis.call('HGET', job_key(j), 'status')
    if st ~= 'queued' and st ~= 'running' then redis.call('SREM', owner_key(owner), j) end
  end
  if redis.call('SCARD', owner_key(owner)) >= per_owner then
    redis.call('HINCRBY', METRICS, 'submits_refused_owner_cap', 1)
    return {'owner_full', '', '', -1, ''}
  end
end
if redis.call('ZCARD', queued_key(model)) >= tonumber(ARGV[7]) then return {'full', '', '', -1, ''} end
local seq = redis.call('INCR', P .. ':seq')
local entry = redis.call('XADD', stream_key(model), '*', 'job', id)
redis.call('HSET', job_key(id), 'id', id, 'status', 'queued', 'model', model,
  'params', ARGV[4], 'digest', ARGV[5], 'created_at', now, 'updated_at', now,
  'entry', entry, 'seq', seq, 'attempt', 0, 'lease', 0, 'owner', owner)
if webhook ~= '' then redis.call('HSET', job_key(id), 'webhook', webhook) end
redis.call('SADD', owner_key(owner), id)
redis.call('ZADD', queued_key(model), seq, id)
redis.call('SADD', P .. ':models', model)
redis.call('HINCRBY', METRICS, 'jobs_submitted', 1)
if idem ~= '' then redis.call('SET', idem, id, 'EX', ARGV[9]) end
return describe('created', id)
"""
)

# After XREADGROUP: ARGV: prefix, worker, now, then (entry_id, job_id) pairs, model last.
ACTIVATE = (
    _PREAMBLE
    + r"""
local worker, now, model = ARGV[2], ARGV[3], ARGV[#ARGV]
local out = {}
for i = 4, #ARGV - 1, 2 do
  local entry, id = ARGV[i], ARGV[i + 1]
  local st = redis.call('HGET', job_key(id), 'status')
  if st == 'queued' then
    table.insert(out, start_run(id, worker, now))
  elseif st ~= 'running' then
    retire(model, entry)  -- canceled, finished or expired meanwhile: drop the entry
  end
end
return out
"""
)

# ARGV: prefix, worker, now, model, min_idle_ms, count, max_attempts, job_ttl, scan_limit
RECLAIM = (
    _PREAMBLE
    + r"""
local worker, now, model = ARGV[2], ARGV[3], ARGV[4]
local min_idle, count, max_attempts = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local job_ttl, scan_limit = ARGV[8], tonumber(ARGV[9])
local stream = stream_key(model)
local out, alive, cursor, scanned = {}, {}, '-', 0
while #out < count and scanned < scan_limit do
  local pending = redis.call('XPENDING', stream, GROUP, 'IDLE', min_idle, cursor, '+', 100)
  if #pending == 0 then break end
  for _, p in ipairs(pending) do
    if #out >= count then break end
    scanned = scanned + 1
    local entry, owner = p[1], p[2]
    cursor = '(' .. entry
    if alive[owner] == nil then alive[owner] = redis.call('EXISTS', worker_key(owner)) == 1 end
    if not alive[owner] then
      -- Heartbeats decide: only a dead (or released) owner's entry is taken over.
      local got = redis.call('XCLAIM', stream, GROUP, worker, min_idle, entry, 'JUSTID')
      if #got == 1 then
        local rows = redis.call('XRANGE', stream, entry, entry)
        local id = rows[1] and rows[1][2][2]
        local st = id and redis.call('HGET', job_key(id), 'status')
        if st == 'queued' then
          table.insert(out, start_run(id, worker, now))
        elseif st == 'running' then
          local attempt = tonumber(redis.call('HGET', job_key(id), 'attempt'))
          if attempt >= max_attempts then
            redis.call('HSET', job_key(id), 'error_code', 'max_attempts', 'error',
              'the worker running this job stopped responding ' .. attempt ..
              ' time(s); giving up after ' .. max_attempts .. ' attempt(s)')
            finalize(id, 'failed', now, job_ttl)
          else
            redis.call('HINCRBY', METRICS, 'jobs_reclaimed', 1)
            table.insert(out, start_run(id, worker, now))
          end
        else
          retire(model, entry)
        end
      end
    end
  end
end
return out
"""
)

# ARGV: prefix, job_id, worker, lease, now, step, total, eta ('' = unknown), message_json
PROGRESS = (
    _PREAMBLE
    + r"""
local id = ARGV[2]
if not owns(id, ARGV[3], ARGV[4]) then return 0 end
redis.call('HSET', job_key(id), 'step', ARGV[6], 'total', ARGV[7], 'updated_at', ARGV[5])
if ARGV[8] == '' then redis.call('HDEL', job_key(id), 'eta_s')
else redis.call('HSET', job_key(id), 'eta_s', ARGV[8]) end
redis.call('PUBLISH', channel(id), ARGV[9])
return 1
"""
)

# ARGV: prefix, job_id, worker, lease, now, result_ttl, job_ttl, seeds_json, latency_bounds,
#       format, then image bytes...
FINISH = (
    _PREAMBLE
    + r"""
local id, now = ARGV[2], ARGV[5]
if not owns(id, ARGV[3], ARGV[4]) then return 0 end
local n = #ARGV - 10
local images = images_key(id)
redis.call('DEL', images)
for i = 1, n do redis.call('HSET', images, tostring(i - 1), ARGV[10 + i]) end
if n > 0 then redis.call('EXPIRE', images, ARGV[6]) end
redis.call('HSET', job_key(id), 'image_count', n, 'seeds', ARGV[8], 'format', ARGV[10],
  'expires_at', tostring(tonumber(now) + tonumber(ARGV[6])))
local created = tonumber(redis.call('HGET', job_key(id), 'created_at'))
observe('job_latency_seconds', tonumber(now) - created, ARGV[9])
redis.call('HINCRBY', METRICS, 'images_generated', n)
finalize(id, 'succeeded', now, ARGV[7])
return 1
"""
)

# ARGV: prefix, job_id, worker, lease, now, job_ttl, error_code, error_message
FAIL = (
    _PREAMBLE
    + r"""
local id = ARGV[2]
if not owns(id, ARGV[3], ARGV[4]) then return 0 end
redis.call('HSET', job_key(id), 'error_code', ARGV[7], 'error', ARGV[8])
finalize(id, 'failed', ARGV[5], ARGV[6])
return 1
"""
)

# Graceful hand-back: ARGV: prefix, job_id, worker, lease, now
RELEASE = (
    _PREAMBLE
    + r"""
local id, now = ARGV[2], ARGV[5]
if not owns(id, ARGV[3], ARGV[4]) then return 0 end
local job = job_key(id)
local v = redis.call('HMGET', job, 'model', 'entry', 'seq')
redis.call('HINCRBY', job, 'attempt', -1)  -- a drained run is not a failed attempt
redis.call('HSET', job, 'status', 'queued', 'updated_at', now)
redis.call('HDEL', job, 'worker', 'step', 'total', 'eta_s')
redis.call('SREM', RUNNING, id)
redis.call('ZADD', queued_key(v[1]), v[3], id)
-- Park the entry on a consumer that never heart-beats, idle "forever": the next reclaim
-- by any live worker takes it at once.
redis.call('XCLAIM', stream_key(v[1]), GROUP, '__released__', 0, v[2], 'IDLE', 1000000000000, 'JUSTID')
publish_status(id, 'queued')
return 1
"""
)

# ARGV: prefix, job_id, now, job_ttl, owner ('' = any)
# → 'missing' (unknown, or another owner's) | 'canceled' | <terminal status it already had>
CANCEL = (
    _PREAMBLE
    + r"""
local id = ARGV[2]
local v = redis.call('HMGET', job_key(id), 'status', 'owner')
local st = v[1]
if not st then return 'missing' end
if ARGV[5] ~= '' and ARGV[5] ~= (v[2] or 'anonymous') then return 'missing' end
if st ~= 'queued' and st ~= 'running' then return st end
finalize(id, 'canceled', ARGV[3], ARGV[4])
return 'canceled'
"""
)

# ARGV: prefix, model → number of consumers removed (atomic: no entry can slip in between)
PRUNE_CONSUMERS = (
    _PREAMBLE
    + r"""
local stream = stream_key(ARGV[2])
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, GROUP)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['name'] ~= '__released__'
      and redis.call('EXISTS', worker_key(info['name'])) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, info['name'])
    removed = removed + 1
  end
end
return removed
"""
)

# ARGV: prefix, histogram name, bounds csv, values...
OBSERVE = (
    _PREAMBLE
    + r"""
for i = 4, #ARGV do observe(ARGV[2], tonumber(ARGV[i]), ARGV[3]) end
return #ARGV - 3
"""
)
