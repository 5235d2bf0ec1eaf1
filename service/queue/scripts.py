"""Lua scripts behind the queue: every conditional multi-key state change is one script.

Why Lua and not MULTI: the changes are conditional (is the job still queued? does this
worker still own it?), and a check followed by a write must not interleave with a cancel
or a reclaim. A :class:`Script` names its arguments: ``ARGV[1]`` is always the key prefix
``P``, then :attr:`Script.params` in order (bound to Lua locals of the same names), then an
optional variable-length tail (:attr:`Script.rest`, a Lua table). Key names come from the
table ``K`` generated from :data:`service.queue.keys.LAYOUT` (a single Redis, not Cluster:
keys are computed inside the scripts). Callers go through
:meth:`service.queue.store.QueueStore.run`, which checks the names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.queue.keys import ANONYMOUS, GROUP, RELEASED, WEBHOOK_GROUP, lua_keys
from service.ratelimit import GCRA_LUA


@dataclass(frozen=True)
class Script:
    """A Lua body with named arguments (see the module docstring)."""

    name: str
    body: str
    params: tuple[str, ...] = ()
    rest: str | None = None
    helpers: str = ""

    @property
    def source(self) -> str:
        """The full Lua text: preamble, helpers, argument bindings, body."""
        bind = [f"local {p} = ARGV[{i + 2}]" for i, p in enumerate(self.params)]
        if self.rest:
            first = len(self.params) + 2
            bind.append(f"local {self.rest} = {{}}")
            bind.append(f"for i = {first}, #ARGV do table.insert({self.rest}, ARGV[i]) end")
        return _PREAMBLE + self.helpers + "\n".join(bind) + "\n" + self.body

    def argv(self, prefix: str, args: Mapping[str, Any], rest: Sequence[Any] = ()) -> list[Any]:
        """ARGV for a call; a missing or unknown argument name is a TypeError, not a bug
        found later in Lua."""
        if set(args) != set(self.params):
            missing, unknown = set(self.params) - set(args), set(args) - set(self.params)
            raise TypeError(
                f"script {self.name}: missing {missing or '{}'}, unknown {unknown or '{}'}"
            )
        if rest and not self.rest:
            raise TypeError(f"script {self.name} takes no variable-length arguments")
        return [prefix, *(args[p] for p in self.params), *rest]


_PREAMBLE = (
    r"""
redis.replicate_commands()
local P = ARGV[1]
"""
    + lua_keys()
    + f"""
local GROUP = '{GROUP}'
local WEBHOOK_GROUP = '{WEBHOOK_GROUP}'
local RELEASED = '{RELEASED}'
local ANONYMOUS = '{ANONYMOUS}'
"""
    + r"""
local function observe(name, value, bounds)
  local le = '+Inf'
  for b in string.gmatch(bounds, '[^,]+') do
    if value <= tonumber(b) then le = b; break end
  end
  redis.call('HINCRBY', K.metrics, name .. '_bucket:' .. le, 1)
  redis.call('HINCRBYFLOAT', K.metrics, name .. '_sum', tostring(value))
  redis.call('HINCRBY', K.metrics, name .. '_count', 1)
end

local function retire(model, priority, entry)
  local stream = stream_of(model, priority)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
end

-- Leave an entry for later: it moves to a consumer that never heart-beats, idle "forever",
-- so the next reclaim by any live worker looks at it first (drain hand-back, running cap).
local function park(model, priority, entry)
  redis.call('XCLAIM', stream_of(model, priority), GROUP, RELEASED, 0, entry, 'IDLE', 1000000000000, 'JUSTID')
end

-- Whether the owner already runs `cap` jobs (0 = no cap). Ids whose job is gone or no longer
-- running (a record lost to eviction) are dropped first, so the set heals itself.
local function at_running_cap(owner, cap)
  cap = tonumber(cap)
  if cap <= 0 then return false end
  local set = K.owner_running(owner or ANONYMOUS)
  if redis.call('SCARD', set) < cap then return false end
  for _, j in ipairs(redis.call('SMEMBERS', set)) do
    if redis.call('HGET', K.job(j), 'status') ~= 'running' then redis.call('SREM', set, j) end
  end
  return redis.call('SCARD', set) >= cap
end

local function publish_status(id, status)
  redis.call('PUBLISH', K.events(id), '{"type":"status","id":"' .. id .. '","status":"' .. status .. '"}')
end

-- Terminal transition shared by finish / fail / cancel / give-up: the entry leaves the
-- stream, the job leaves the live sets, the record starts its countdown, and a job with
-- a webhook gets its delivery queued in the same atomic step (service.webhook_dispatch).
local function finalize(id, status, now, job_ttl)
  local job = K.job(id)
  local v = redis.call('HMGET', job, 'model', 'entry', 'owner', 'webhook', 'priority')
  redis.call('HSET', job, 'status', status, 'finished_at', now, 'updated_at', now)
  redis.call('HDEL', job, 'eta_s')
  redis.call('SREM', K.running, id)
  redis.call('ZREM', K.queued(v[1]), id)
  retire(v[1], v[5], v[2])
  redis.call('SREM', K.owner_active(v[3] or ANONYMOUS), id)
  redis.call('SREM', K.owner_running(v[3] or ANONYMOUS), id)
  if v[4] and v[4] ~= '' then
    local e = redis.call('HMGET', job, 'error_code', 'error', 'image_count')
    redis.call('XADD', K.webhooks, '*', 'job', id, 'status', status, 'url', v[4],
      'attempt', '1', 'error_code', e[1] or '', 'error', e[2] or '', 'images', e[3] or '0',
      'finished_at', now)
  end
  redis.call('EXPIRE', job, job_ttl)
  redis.call('EXPIRE', K.inputs(id), job_ttl)
  redis.call('DEL', K.preview(id))
  redis.call('HINCRBY', K.metrics, 'jobs_' .. status, 1)
  publish_status(id, status)
end

-- Start (or restart) a run of a job for a worker; returns the claim tuple.
local function start_run(id, worker, now)
  local job = K.job(id)
  local attempt = redis.call('HINCRBY', job, 'attempt', 1)
  local lease = redis.call('HINCRBY', job, 'lease', 1)
  redis.call('HSET', job, 'status', 'running', 'worker', worker, 'started_at', now, 'updated_at', now)
  redis.call('HDEL', job, 'step', 'total', 'eta_s')
  redis.call('DEL', K.preview(id))
  local v = redis.call('HMGET', job, 'model', 'params', 'entry', 'owner')
  redis.call('ZREM', K.queued(v[1]), id)
  redis.call('SADD', K.running, id)
  redis.call('SADD', K.owner_running(v[4] or ANONYMOUS), id)
  publish_status(id, 'running')
  return {id, tostring(lease), tostring(attempt), v[2], v[3]}
end

local function owns(id, worker, lease)
  local v = redis.call('HMGET', K.job(id), 'status', 'worker', 'lease')
  return v[1] == 'running' and v[2] == worker and v[3] == lease
end
"""
)

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

# After XREADGROUP: rest = (priority, entry_id, job_id) triples → claim tuples of the
# still-queued jobs. A job whose owner already runs max_running (0 = no cap) jobs is parked
# for a later reclaim instead (fair share: the entries behind it are read meanwhile).
ACTIVATE = Script(
    "activate",
    params=("worker", "now", "model", "max_running"),
    rest="entries",
    body=r"""
local out = {}
for i = 1, #entries, 3 do
  local priority, entry, id = entries[i], entries[i + 1], entries[i + 2]
  local v = redis.call('HMGET', K.job(id), 'status', 'owner')
  if v[1] == 'queued' then
    if at_running_cap(v[2], max_running) then
      park(model, priority, entry)
      redis.call('HINCRBY', K.metrics, 'jobs_deferred_running_cap', 1)
    else
      table.insert(out, start_run(id, worker, now))
    end
  elseif v[1] ~= 'running' then
    retire(model, priority, entry)  -- canceled, finished or expired meanwhile: drop the entry
  end
end
return out
""",
)

# Take over entries idle >= min_idle_ms whose owner has no live heartbeat → claim tuples.
RECLAIM = Script(
    "reclaim",
    params=(
        "worker",
        "now",
        "model",
        "min_idle_ms",
        "count",
        "max_attempts",
        "job_ttl",
        "scan_limit",
        "max_running",
    ),
    body=r"""
count, max_attempts, scan_limit = tonumber(count), tonumber(max_attempts), tonumber(scan_limit)
local out, alive, scanned = {}, {}, 0
for _, priority in ipairs(PRIORITIES) do
local stream, cursor = stream_of(model, priority), '-'
while #out < count and scanned < scan_limit do
  local pending = redis.call('XPENDING', stream, GROUP, 'IDLE', min_idle_ms, cursor, '+', 100)
  if #pending == 0 then break end
  for _, p in ipairs(pending) do
    if #out >= count then break end
    scanned = scanned + 1
    local entry, owner = p[1], p[2]
    cursor = '(' .. entry
    if alive[owner] == nil then alive[owner] = redis.call('EXISTS', K.worker(owner)) == 1 end
    if not alive[owner] then
      -- Heartbeats decide: only a dead (or released / parked) owner's entry is taken over.
      local got = redis.call('XCLAIM', stream, GROUP, worker, min_idle_ms, entry, 'JUSTID')
      if #got == 1 then
        local rows = redis.call('XRANGE', stream, entry, entry)
        local id = rows[1] and rows[1][2][2]
        local st = id and redis.call('HGET', K.job(id), 'status')
        if st == 'queued' then
          if at_running_cap(redis.call('HGET', K.job(id), 'owner'), max_running) then
            park(model, priority, entry)  -- still at its cap: stays parked
          else
            table.insert(out, start_run(id, worker, now))
          end
        elseif st == 'running' then
          local attempt = tonumber(redis.call('HGET', K.job(id), 'attempt'))
          if attempt >= max_attempts then
            redis.call('HSET', K.job(id), 'error_code', 'max_attempts', 'error',
              'the worker running this job stopped responding ' .. attempt ..
              ' time(s); giving up after ' .. max_attempts .. ' attempt(s)')
            finalize(id, 'failed', now, job_ttl)
          else
            redis.call('HINCRBY', K.metrics, 'jobs_reclaimed', 1)
            table.insert(out, start_run(id, worker, now))
          end
        else
          retire(model, priority, entry)
        end
      end
    end
  end
end
end
return out
""",
)

# → 1, or 0 when the job is no longer this lease's. eta: '' = unknown.
PROGRESS = Script(
    "progress",
    params=("job_id", "worker", "lease", "now", "step", "total", "eta", "message"),
    body=r"""
if not owns(job_id, worker, lease) then return 0 end
redis.call('HSET', K.job(job_id), 'step', step, 'total', total, 'updated_at', now)
if eta == '' then redis.call('HDEL', K.job(job_id), 'eta_s')
else redis.call('HSET', K.job(job_id), 'eta_s', eta) end
redis.call('PUBLISH', K.events(job_id), message)
return 1
""",
)

# The lease holder's latest live preview: kept (for A1111's /progress) and published (SSE).
PREVIEW = Script(
    "preview",
    params=("job_id", "worker", "lease", "ttl", "message"),
    body=r"""
if not owns(job_id, worker, lease) then return 0 end
redis.call('SET', K.preview(job_id), message, 'EX', ttl)
redis.call('PUBLISH', K.events(job_id), message)
return 1
""",
)

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

# → number of consumers removed (atomic: no entry can slip in between)
PRUNE_CONSUMERS = Script(
    "prune_consumers",
    params=("model",),
    body=r"""
local removed = 0
for _, priority in ipairs(PRIORITIES) do
  local stream = stream_of(model, priority)
  if redis.call('EXISTS', stream) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, GROUP)) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['pending'] == 0 and info['name'] ~= RELEASED
          and redis.call('EXISTS', K.worker(info['name'])) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, info['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
""",
)

# rest = the observed values of histogram `name`.
OBSERVE = Script(
    "observe",
    params=("name", "bounds"),
    rest="values",
    body=r"""
for _, value in ipairs(values) do observe(name, tonumber(value), bounds) end
return #values
""",
)

# Webhook delivery failed: the entry leaves the stream for the retry zset (service.webhook_dispatch).
WEBHOOK_RETRY = Script(
    "webhook_retry",
    params=("entry_id", "due_ms", "member"),
    body=r"""
redis.call('XACK', K.webhooks, WEBHOOK_GROUP, entry_id)
redis.call('XDEL', K.webhooks, entry_id)
redis.call('ZADD', K.webhooks_retry, due_ms, member)
redis.call('HINCRBY', K.metrics, 'webhooks_retried', 1)
return 1
""",
)

# Due retries go back to the delivery stream (fields from the member's JSON).
WEBHOOK_PROMOTE = Script(
    "webhook_promote",
    params=("now_ms", "limit"),
    body=r"""
local due = redis.call('ZRANGEBYSCORE', K.webhooks_retry, '-inf', now_ms, 'LIMIT', 0, tonumber(limit))
for _, member in ipairs(due) do
  redis.call('ZREM', K.webhooks_retry, member)
  local fields = {}
  for k, v in pairs(cjson.decode(member)) do
    table.insert(fields, k)
    table.insert(fields, tostring(v))
  end
  redis.call('XADD', K.webhooks, '*', unpack(fields))
end
return #due
""",
)
