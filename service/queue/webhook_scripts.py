"""Lua scripts of the webhook dispatcher (:mod:`service.webhook_dispatch`): a failed
delivery moves to the retry zset, due retries move back to the delivery stream.

Deliveries themselves are queued by the preamble's ``finalize`` (:mod:`service.queue.lua`).
"""

from __future__ import annotations

from service.queue.lua import Script

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
