"""Python client for ldmserve's native API (only httpx and pydantic; no torch).

::

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        pngs = client.generate("a lighthouse at dusk", steps=20, seed=1)  # list[bytes]
        job = client.submit(prompt="a red fox", num_images=2)             # Job, at once
        for event in client.stream(job.id):                              # progress, done
            handle(event)                                                # your code

:class:`AsyncClient` has the same methods as coroutines (``stream`` an async iterator).
Errors are typed (:class:`ApiError` and subclasses by status; :class:`JobFailed`,
:class:`JobTimeout`). 429 and 503 answers are retried with exponential backoff honouring
``Retry-After`` for reads, and for submits only when they carry an ``Idempotency-Key``
(so a retry can never queue the same job twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from service.client_models import (  # the values and errors users catch, re-exported here
    TERMINAL,
    ApiError,
    AuthenticationError,
    Conflict,
    DoneEvent,
    Event,
    Gone,
    ImageRef,
    InvalidRequest,
    Job,
    JobErrorInfo,
    JobEvent,
    JobFailed,
    JobTimeout,
    LdmserveError,
    NotFound,
    PreviewEvent,
    Progress,
    ProgressEvent,
    RateLimited,
    Unavailable,
)
from service.client_wire import (
    SSEParser,
    decode_event,
    job_from_submit,
    raise_for,
    retry_delay,
    retryable,
    submit_body,
)

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "Conflict",
    "DoneEvent",
    "Event",
    "Gone",
    "ImageRef",
    "InvalidRequest",
    "Job",
    "JobErrorInfo",
    "JobEvent",
    "JobFailed",
    "JobTimeout",
    "LdmserveError",
    "NotFound",
    "PreviewEvent",
    "Progress",
    "ProgressEvent",
    "RateLimited",
    "Unavailable",
]

log = logging.getLogger(__name__)


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s


# ---------------------------------------------------------------------------- sync client


class Client(_Base):
    """Blocking client; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff_s, max_backoff_s)
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, headers=headers, **kwargs)
            if attempt < self.max_retries and retryable(method, headers, response):
                delay = retry_delay(attempt, response, self.backoff_s, self.max_backoff_s)
                log.info("%s %s: %d, retry in %.2f s", method, path, response.status_code, delay)
                time.sleep(delay)
                continue
            raise_for(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        """Queue a job (native field names: prompt, steps, seed, num_images, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self._request("POST", "/v1/jobs", json=submit_body(fields), headers=headers)
        return job_from_submit(r.json())

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.25) -> Job:
        """Poll until the job ended; JobTimeout after ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(job, timeout or 0.0)
            time.sleep(poll_s)

    def stream(self, job_id: str) -> Iterator[Event]:
        """The job's events (job, progress, preview, done) as they happen."""
        parser = SSEParser()
        url = f"/v1/jobs/{job_id}/events"
        timeout = httpx.Timeout(self.timeout, read=None)
        with self._http.stream("GET", url, headers=self.headers, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise_for(response)
            for line in response.iter_lines():
                parsed = parser.feed(line)
                event = decode_event(*parsed) if parsed else None
                if event is not None:
                    yield event
                    if isinstance(event, DoneEvent):
                        return

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def images(self, job: Job | str) -> list[bytes]:
        """Encoded bytes of every image of a succeeded job."""
        job = self.get(job) if isinstance(job, str) else job
        if not job.images and job.status == "succeeded":
            job = self.get(job.id)
        return [self._request("GET", ref.url).content for ref in job.images]

    def jobs(self, status: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """The caller's jobs, newest first, across pages."""
        cursor: str | None = None
        while True:
            params = {"limit": page_size, "status": status, "cursor": cursor}
            body = self._request("GET", "/v1/jobs", params=submit_body(params)).json()
            yield from (Job.model_validate(j) for j in body["jobs"])
            cursor = body.get("next_cursor")
            if not cursor:
                return

    def generate(self, prompt: str, *, timeout: float | None = None, **fields: Any) -> list[bytes]:
        """Submit, wait, download: the images of one job. JobFailed if it did not succeed."""
        key = fields.pop("idempotency_key", None) or uuid.uuid4().hex
        job = self.wait(self.submit(idempotency_key=key, prompt=prompt, **fields).id, timeout)
        if job.status != "succeeded":
            raise JobFailed(job)
        return self.images(job)


# ---------------------------------------------------------------------------- async client


class AsyncClient(_Base):
    """The same methods as :class:`Client`, as coroutines."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff_s, max_backoff_s)
        self._http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, headers=headers, **kwargs)
            if attempt < self.max_retries and retryable(method, headers, response):
                delay = retry_delay(attempt, response, self.backoff_s, self.max_backoff_s)
                log.info("%s %s: %d, retry in %.2f s", method, path, response.status_code, delay)
                await asyncio.sleep(delay)
                continue
            raise_for(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(self, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = await self._request("POST", "/v1/jobs", json=submit_body(fields), headers=headers)
        return job_from_submit(r.json())

    async def get(self, job_id: str) -> Job:
        return Job.model_validate((await self._request("GET", f"/v1/jobs/{job_id}")).json())

    async def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.25) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(job, timeout or 0.0)
            await asyncio.sleep(poll_s)

    async def stream(self, job_id: str) -> AsyncIterator[Event]:
        parser = SSEParser()
        url = f"/v1/jobs/{job_id}/events"
        timeout = httpx.Timeout(self.timeout, read=None)
        async with self._http.stream("GET", url, headers=self.headers, timeout=timeout) as r:
            if r.status_code >= 400:
                await r.aread()
                raise_for(r)
            async for line in r.aiter_lines():
                parsed = parser.feed(line)
                event = decode_event(*parsed) if parsed else None
                if event is not None:
                    yield event
                    if isinstance(event, DoneEvent):
                        return

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate((await self._request("DELETE", f"/v1/jobs/{job_id}")).json())

    async def images(self, job: Job | str) -> list[bytes]:
        job = await self.get(job) if isinstance(job, str) else job
        if not job.images and job.status == "succeeded":
            job = await self.get(job.id)
        return [(await self._request("GET", ref.url)).content for ref in job.images]

    async def jobs(self, status: str | None = None, page_size: int = 50) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            params = {"limit": page_size, "status": status, "cursor": cursor}
            body = (await self._request("GET", "/v1/jobs", params=submit_body(params))).json()
            for j in body["jobs"]:
                yield Job.model_validate(j)
            cursor = body.get("next_cursor")
            if not cursor:
                return

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **fields: Any
    ) -> list[bytes]:
        key = fields.pop("idempotency_key", None) or uuid.uuid4().hex
        submitted = await self.submit(idempotency_key=key, prompt=prompt, **fields)
        job = await self.wait(submitted.id, timeout)
        if job.status != "succeeded":
            raise JobFailed(job)
        return await self.images(job)
