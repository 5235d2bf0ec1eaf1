"""The Redis data model by role: the API side and the worker side over one shared store.

- :mod:`service.queue.keys`: the key layout (once; the Lua scripts derive theirs from it)
- :mod:`service.queue.lua`: :class:`Script` (named arguments) and the preamble all scripts share
- :mod:`service.queue.request_scripts`, :mod:`service.queue.claim_scripts`,
  :mod:`service.queue.run_scripts`, :mod:`service.queue.outcome_scripts`,
  :mod:`service.queue.webhook_scripts`: the Lua scripts by lifecycle stage
- :mod:`service.queue.store`: :class:`QueueStore` (connection, keys, script calls)
- :mod:`service.queue.api_side`: :class:`ApiQueue` (submit, get, image, cancel, registry reads)
- :mod:`service.queue.worker_side`: :class:`WorkerQueue` (heartbeat, claim, reclaim,
  progress, finish, fail, release)
- :mod:`service.queue.records`, :mod:`service.queue.errors`: values and refusals

No torch, no model imports anywhere in the package: the API process uses it.
"""

from service.queue.api_side import ApiQueue
from service.queue.errors import IdempotencyMismatch, OwnerQueueFull, QueueFull, RateLimited
from service.queue.records import Claim, JobRecord, SubmitResult, WorkerInfo, new_worker_id
from service.queue.store import QueueStore
from service.queue.worker_side import WorkerQueue

__all__ = [
    "ApiQueue",
    "Claim",
    "IdempotencyMismatch",
    "JobRecord",
    "OwnerQueueFull",
    "QueueFull",
    "QueueStore",
    "RateLimited",
    "SubmitResult",
    "WorkerInfo",
    "WorkerQueue",
    "new_worker_id",
]
