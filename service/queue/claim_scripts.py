"""Lua scripts by which workers take jobs: activating read entries, reclaiming a dead
worker's entries, and pruning consumers that left.

Run by :class:`service.queue.worker_side.WorkerQueue`; ``start_run``, ``park`` and the
running cap come from the preamble in :mod:`service.queue.lua`.
"""

from __future__ import annotations

from service.queue.lua import Script

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
