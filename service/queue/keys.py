"""The Redis key layout, once: Python callers and the Lua scripts both derive names from it.

``P`` = ``Settings.key_prefix`` (default ``ldmserve``). :data:`LAYOUT` maps each key's role
to its name below ``P:``; :class:`Keys` formats them in Python and :func:`lua_keys` emits
the same names as a Lua table ``K`` for the scripts (:mod:`service.queue.lua`), so a
key is renamed in one place.

==================================  ======  ==================================================
``P:model:{model}:stream``          stream  one entry per ``normal`` job (field ``job``); group ``workers``
``P:model:{model}:stream:high``     stream  the same for ``high`` jobs (read first)
``P:model:{model}:stream:low``      stream  the same for ``low`` jobs (read last)
``P:model:{model}:queued``          zset    queued job ids scored by submit order (position)
``P:job:{id}``                      hash    the job record (see :class:`~service.queue.records.JobRecord`)
``P:job:{id}:images``               hash    ``"0"``, ``"1"``, … → encoded image bytes (TTL)
``P:job:{id}:events``               pubsub  progress / status messages (JSON) for SSE
``P:job:{id}:inputs``               hash    img2img / inpainting input PNGs by field name
``P:job:{id}:preview``              string  the running job's latest live preview (JSON, TTL)
``P:model:{model}:capabilities``    string  what the model's workers last published (JSON)
``P:idem:{sha256(owner\nkey)}``     string  Idempotency-Key → job id (scoped per owner)
``P:owner:{owner}:active``          set     the owner's unfinished job ids (per-key cap)
``P:owner:{owner}:running``         set     the owner's running job ids (running cap, fair share)
``P:owner:{owner}:jobs``            zset    the owner's job ids by submit order (GET /v1/jobs)
``P:owner:{owner}:a1111``           string  the owner's A1111 ``sd_model_checkpoint`` choice
``P:rate:{owner}``                  string  GCRA state of the owner's submits (service.ratelimit)
``P:webhooks``                      stream  webhook deliveries due now; group ``dispatchers``
``P:webhooks:retry``                zset    deliveries waiting for a retry, scored by due ms
``P:worker:{worker_id}``            string  heartbeat: JSON WorkerInfo, TTL ``worker_ttl_s``
``P:workers``                       zset    worker ids by last heartbeat (for listing)
``P:running``                       set     ids of running jobs (gauge)
``P:models``                        set     models that ever had a stream (metrics)
``P:metrics``                       hash    counters and histograms (see service.metrics)
``P:seq``                           string  submit counter (queue order)
==================================  ======  ==================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

GROUP = "workers"  # the consumer group of every model stream
WEBHOOK_GROUP = "dispatchers"  # the consumer group of P:webhooks
RELEASED = "__released__"  # the never-beating consumer that parks handed-back entries
ANONYMOUS = "anonymous"  # the owner of every job while auth is off (service.auth)

# Job priorities, highest first: workers read the streams in this order.
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
STREAM_ROLE = {"high": "stream_high", "normal": "stream", "low": "stream_low"}

# Histogram bucket bounds of the P:metrics hash (fields ``<name>_bucket:<le>``).
LATENCY_BOUNDS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_ROW_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# role -> name below "P:"; "{}" is the one variable part (a job id, model, owner, ...).
LAYOUT: dict[str, str] = {
    "job": "job:{}",
    "images": "job:{}:images",
    "events": "job:{}:events",
    "inputs": "job:{}:inputs",
    "preview": "job:{}:preview",
    "capabilities": "model:{}:capabilities",
    "stream": "model:{}:stream",
    "stream_high": "model:{}:stream:high",
    "stream_low": "model:{}:stream:low",
    "queued": "model:{}:queued",
    "idem": "idem:{}",
    "owner_active": "owner:{}:active",
    "owner_running": "owner:{}:running",
    "owner_jobs": "owner:{}:jobs",
    "owner_a1111": "owner:{}:a1111",
    "rate": "rate:{}",
    "webhooks": "webhooks",
    "webhooks_retry": "webhooks:retry",
    "worker": "worker:{}",
    "workers": "workers",
    "running": "running",
    "models": "models",
    "metrics": "metrics",
    "seq": "seq",
}


def _lua_string(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f"'{value}'"


def lua_keys() -> str:
    """Lua defining ``K`` from :data:`LAYOUT` (``K.job(id)``, ``K.running``) below ``P``."""
    lines = ["local K = {}"]
    # stream_of(model, priority): the stream of that priority (anything else: normal's).
    lines.append("local PRIORITIES = {" + ", ".join(_lua_string(p) for p in PRIORITIES) + "}")
    lines.append(
        "local PRIORITY_RANK = {" + ", ".join(f"{p} = {i}" for i, p in enumerate(PRIORITIES)) + "}"
    )
    for role, name in LAYOUT.items():
        if "{}" in name:
            head, tail = name.split("{}")
            expr = f"P .. {_lua_string(':' + head)} .. v"
            if tail:
                expr += f" .. {_lua_string(tail)}"
            lines.append(f"K.{role} = function(v) return {expr} end")
        else:
            lines.append(f"K.{role} = P .. {_lua_string(':' + name)}")
    branches = " ".join(
        f"if priority == {_lua_string(p)} then return K.{role}(model) end"
        for p, role in STREAM_ROLE.items()
        if role != "stream"
    )
    lines.append(f"local function stream_of(model, priority) {branches} return K.stream(model) end")
    return "\n".join(lines) + "\n"


def key_prefix(prefix: str, cluster: bool) -> str:
    """The prefix as written into key names. On Redis Cluster it is a hash tag
    (``{ldmserve}``): every key then lives in one slot, so each script's keys share a slot
    and scripts may compute key names inside (the price: one shard holds all of ldmserve)."""
    return f"{{{prefix}}}" if cluster else prefix


@dataclass(frozen=True)
class Keys:
    """Names of every key for one prefix, so nothing else formats key strings.

    ``prefix`` is the written form (:func:`key_prefix`); :meth:`for_settings` builds it.
    """

    prefix: str

    @classmethod
    def for_settings(cls, key_prefix_setting: str, cluster: bool = False) -> Keys:
        return cls(key_prefix(key_prefix_setting, cluster))

    def _name(self, role: str, part: str = "") -> str:
        return f"{self.prefix}:{LAYOUT[role].format(part)}"

    def job(self, job_id: str) -> str:
        return self._name("job", job_id)

    def images(self, job_id: str) -> str:
        return self._name("images", job_id)

    def events(self, job_id: str) -> str:
        return self._name("events", job_id)

    def inputs(self, job_id: str) -> str:
        """Input images of an img2img / inpainting job (PNG bytes by field name)."""
        return self._name("inputs", job_id)

    def preview(self, job_id: str) -> str:
        """The running job's latest live preview (JSON)."""
        return self._name("preview", job_id)

    def capabilities(self, model: str) -> str:
        """What the model's workers last published it can run (kept when they are gone)."""
        return self._name("capabilities", model)

    def stream(self, model: str, priority: str = "normal") -> str:
        """The model's stream for jobs of ``priority`` (``normal``'s keeps the old name)."""
        return self._name(STREAM_ROLE[priority], model)

    def streams(self, model: str) -> list[str]:
        """The model's streams, highest priority first."""
        return [self.stream(model, p) for p in PRIORITIES]

    def queued(self, model: str) -> str:
        return self._name("queued", model)

    def idem(self, key: str, owner: str = ANONYMOUS) -> str:
        return self._name("idem", hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest())

    def owner_active(self, owner: str) -> str:
        return self._name("owner_active", owner)

    def owner_running(self, owner: str) -> str:
        return self._name("owner_running", owner)

    def owner_jobs(self, owner: str) -> str:
        return self._name("owner_jobs", owner)

    def owner_a1111(self, owner: str) -> str:
        return self._name("owner_a1111", owner)

    def rate(self, owner: str) -> str:
        return self._name("rate", owner)

    def worker(self, worker_id: str) -> str:
        return self._name("worker", worker_id)

    @property
    def webhooks(self) -> str:
        return self._name("webhooks")

    @property
    def webhooks_retry(self) -> str:
        return self._name("webhooks_retry")

    @property
    def workers(self) -> str:
        return self._name("workers")

    @property
    def running(self) -> str:
        return self._name("running")

    @property
    def models(self) -> str:
        return self._name("models")

    @property
    def metrics(self) -> str:
        return self._name("metrics")

    @property
    def seq(self) -> str:
        return self._name("seq")

    def pattern(self, role: str) -> str:
        """A SCAN/KEYS glob for every key of ``role`` (``jobs``: ``P:job:*``)."""
        return self._name(role, "*")
