"""Lua scripts a worker runs while it holds a job: progress, live previews, and the
histogram observations it records.

Progress and previews check the lease (``owns``, preamble in :mod:`service.queue.lua`): a
worker whose job was reclaimed or canceled writes nothing.
"""

from __future__ import annotations

from service.queue.lua import Script

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
