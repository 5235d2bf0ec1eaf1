"""Per-key submit rate limit: GCRA (generic cell rate algorithm) kept in Redis.

One key per owner, ``P:rate:{owner}``, holds the *theoretical arrival time* (TAT, ms on
the Redis clock) of the next request. A request at ``now`` is allowed when
``TAT + T - burst * T <= now`` (``T`` = 60000 / per_min ms); the TAT then advances by
``T``. So a key may make ``burst`` requests at once and then one every ``T`` — the same
as a token bucket of ``burst`` tokens refilled at ``per_min`` per minute, with one number
of state. The check runs inside the submit script (:data:`service.queue.request_scripts.SUBMIT`),
atomically with the queue caps, on the Redis clock: every API replica shares the limit.

A refused request learns exactly when it would pass: ``allow_at - now`` ms, sent as
``Retry-After`` rounded up to whole seconds.
"""

from __future__ import annotations

import math

# Lua: gcra(key, per_min, burst) -> 0 (allowed, state advanced) | ms until allowed (refused).
GCRA_LUA = r"""
local function gcra(key, per_min, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local interval = 60000 / per_min
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then return math.ceil(allow_at - now) end
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
  return 0
end
"""


def burst_of(per_min: float, burst: int | None) -> int:
    """Requests allowed at once: the setting, else one minute's worth (at least 1)."""
    return burst if burst is not None else max(1, math.ceil(per_min))


def retry_after_s(wait_ms: int) -> int:
    """``Retry-After`` seconds for a wait in ms: rounded up, at least 1."""
    return max(1, math.ceil(wait_ms / 1000))
