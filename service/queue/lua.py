"""The Lua side of the queue: the :class:`Script` type and the preamble every script shares.

Why Lua and not MULTI: the changes are conditional (is the job still queued? does this
worker still own it?), and a check followed by a write must not interleave with a cancel
or a reclaim, so every conditional multi-key state change is one script. A :class:`Script`
names its arguments: ``ARGV[1]`` is always the key prefix ``P``, then :attr:`Script.params`
in order (bound to Lua locals of the same names), then an optional variable-length tail
(:attr:`Script.rest`, a Lua table). Key names come from the table ``K`` generated from
:data:`service.queue.keys.LAYOUT` (a single Redis, not Cluster: keys are computed inside
the scripts). Callers go through :meth:`service.queue.store.QueueStore.run`, which checks
the names.

The preamble holds the helpers the lifecycle stages share (finalize, start_run, owns, park,
the running cap, histograms); the scripts themselves live by stage:
:mod:`service.queue.request_scripts` (submit, cancel), :mod:`service.queue.claim_scripts`
(activate, reclaim, consumer pruning), :mod:`service.queue.run_scripts` (progress, previews,
histogram observations), :mod:`service.queue.outcome_scripts` (finish, fail, release) and
:mod:`service.queue.webhook_scripts` (delivery retries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.queue.keys import ANONYMOUS, GROUP, RELEASED, WEBHOOK_GROUP, lua_keys


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
