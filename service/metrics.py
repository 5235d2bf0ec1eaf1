"""Prometheus text exposition (format 0.0.4) of the numbers kept in Redis.

Written by hand: the counters live in Redis (shared by every API replica and worker), so
a client library's in-process registry would add nothing but a dependency.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from service.queue.keys import BATCH_ROW_BOUNDS, LATENCY_BOUNDS, PRIORITIES

if TYPE_CHECKING:
    from service.queue import ApiQueue

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(raw: str | float | int | None) -> str:
    if raw is None:
        return "0"
    value = float(raw)
    return str(int(value)) if value.is_integer() else repr(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: Any, labels: Mapping[str, str] | None = None) -> None:
        rendered = ""
        if labels:
            rendered = "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"
        self.lines.append(f"{name}{rendered} {_num(value)}")

    def histogram(
        self, name: str, help_text: str, counters: Mapping[str, str], bounds: Iterable[float]
    ) -> None:
        """Redis holds per-bucket counts under ``<key>_bucket:<le>``; Prometheus wants them
        cumulative."""
        key = name.removeprefix("ldmserve_")
        self.family(name, "histogram", help_text)
        running = 0
        for le in [repr(float(b)) for b in bounds] + ["+Inf"]:
            running += int(counters.get(f"{key}_bucket:{le}", 0))
            self.sample(f"{name}_bucket", running, {"le": le})
        self.sample(f"{name}_sum", counters.get(f"{key}_sum"))
        self.sample(f"{name}_count", counters.get(f"{key}_count"))


async def snapshot(queue: ApiQueue) -> dict[str, Any]:
    """Raw numbers for /metrics in few round trips: counters hash, per-model queue depth
    and stream length, running set size, live workers."""
    models = await queue.models()
    keys = queue.store.keys
    async with queue.store.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.metrics)
        pipe.scard(keys.running)
        pipe.xlen(keys.webhooks)
        pipe.zcard(keys.webhooks_retry)
        for m in models:
            pipe.zcard(keys.queued(m))
            for stream in keys.streams(m):  # one per priority
                pipe.xlen(stream)
        raw = await pipe.execute()
    per_model = 1 + len(PRIORITIES)
    return {
        "counters": {k.decode(): v.decode() for k, v in raw[0].items()},
        "running": int(raw[1]),
        "webhooks_pending": int(raw[2]) + int(raw[3]),
        "queued": {m: int(raw[4 + per_model * i]) for i, m in enumerate(models)},
        "stream_length": {
            m: sum(int(n) for n in raw[5 + per_model * i : 4 + per_model * (i + 1)])
            for i, m in enumerate(models)
        },
        "workers": await queue.live_workers(),
    }


def render(snapshot: Mapping[str, Any]) -> str:
    """Text for ``GET /metrics`` from :func:`snapshot`."""
    counters: Mapping[str, str] = snapshot["counters"]
    queued: Mapping[str, int] = snapshot["queued"]
    w = _Writer()

    w.family("ldmserve_queue_depth", "gauge", "Jobs waiting for a worker, per model.")
    for model, depth in sorted(queued.items()):
        w.sample("ldmserve_queue_depth", depth, {"model": model})
    w.family(
        "ldmserve_stream_length", "gauge", "Entries in the model's streams (queued + running)."
    )
    for model, length in sorted(snapshot["stream_length"].items()):
        w.sample("ldmserve_stream_length", length, {"model": model})

    w.family("ldmserve_jobs", "gauge", "Jobs currently in a live state, by status.")
    w.sample("ldmserve_jobs", sum(queued.values()), {"status": "queued"})
    w.sample("ldmserve_jobs", snapshot["running"], {"status": "running"})
    w.family("ldmserve_jobs_submitted_total", "counter", "Jobs accepted by the API.")
    w.sample("ldmserve_jobs_submitted_total", counters.get("jobs_submitted"))
    w.family("ldmserve_jobs_finished_total", "counter", "Jobs that reached a final status.")
    for status in ("succeeded", "failed", "canceled"):
        w.sample("ldmserve_jobs_finished_total", counters.get(f"jobs_{status}"), {"status": status})
    w.family("ldmserve_jobs_reclaimed_total", "counter", "Runs taken over from dead workers.")
    w.sample("ldmserve_jobs_reclaimed_total", counters.get("jobs_reclaimed"))
    w.family("ldmserve_jobs_deferred_total", "counter",
             "Claims passed over because the key ran max_running_per_key jobs.")  # fmt: skip
    w.sample("ldmserve_jobs_deferred_total", counters.get("jobs_deferred_running_cap"))

    w.histogram(
        "ldmserve_job_latency_seconds",
        "Submit-to-success time of succeeded jobs.",
        counters,
        LATENCY_BOUNDS,
    )
    w.family("ldmserve_images_total", "counter", "Images generated (rate() gives images/s).")
    w.sample("ldmserve_images_total", counters.get("images_generated"))
    w.histogram(
        "ldmserve_unet_batch_rows",
        "Rows per UNet call, as reported by workers (WorkerQueue.record_batch).",
        counters,
        BATCH_ROW_BOUNDS,
    )

    w.family("ldmserve_submits_refused_total", "counter", "Submits refused per key (429).")
    for reason, key in (("rate_limited", "submits_rate_limited"),
                        ("too_many_jobs", "submits_refused_owner_cap")):  # fmt: skip
        w.sample("ldmserve_submits_refused_total", counters.get(key), {"reason": reason})
    w.family("ldmserve_webhook_deliveries_total", "counter", "Webhook deliveries that ended.")
    for outcome in ("delivered", "failed"):
        value = counters.get(f"webhooks_{outcome}")
        w.sample("ldmserve_webhook_deliveries_total", value, {"outcome": outcome})
    w.family("ldmserve_webhook_retries_total", "counter", "Failed webhook attempts retried.")
    w.sample("ldmserve_webhook_retries_total", counters.get("webhooks_retried"))
    w.family("ldmserve_webhooks_pending", "gauge", "Webhook deliveries due or waiting to retry.")
    w.sample("ldmserve_webhooks_pending", snapshot.get("webhooks_pending", 0))

    workers = snapshot["workers"]
    w.family("ldmserve_workers", "gauge", "Live workers (heartbeat not expired), per model.")
    per_model: dict[str, int] = {}
    for info in workers:
        per_model[info.model] = per_model.get(info.model, 0) + 1
    for model, count in sorted(per_model.items()):
        w.sample("ldmserve_workers", count, {"model": model})
    w.family("ldmserve_workers_total", "gauge", "Live workers, all models.")
    w.sample("ldmserve_workers_total", len(workers))
    return "\n".join(w.lines) + "\n"
