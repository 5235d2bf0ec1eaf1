"""schemathesis against the service's own /openapi.json: generated requests (valid and
invalid) for every operation, sent to the real FastAPI app over ASGI with a real Redis.

The bounded run here (``MAX_EXAMPLES`` per operation, ~30 s) checks that no response is a
5xx and that each response conforms to the schema (status code documented, content type
and body as declared). A longer run against a live service::

    .venv/bin/ldmserve up &                       # or: ldmserve api + ldmserve worker
    .venv/bin/st run http://127.0.0.1:8000/openapi.json \\
        --checks all --max-examples 500 --phases examples,coverage,fuzzing \\
        --exclude-path-regex '/events$'        # SSE of a live job streams until it ends

or this test with more examples: ``LDMSERVE_ST_EXAMPLES=500 .venv/bin/pytest
tests/test_schemathesis.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api import create_app
from service.queue.records import WorkerInfo
from service.settings import Settings
from tests.queues import DEFAULT_KEYS

MAX_EXAMPLES = int(os.environ.get("LDMSERVE_ST_EXAMPLES", "50"))
log = logging.getLogger(__name__)
# positive_data_acceptance ("a schema-valid request must not be refused") is excluded, for
# two reasons: (1) request bodies are strict JSON by design (service/schemas.py), so
# {"width": 312.0} gets 422 although JSON Schema's "type: integer" admits 312.0 (reported to
# the schemas owner: accept integral floats, or say "strict" in the schema); (2) generated
# cases reuse one Idempotency-Key value with different bodies, and that is answered 422
# idempotency_key_reused on purpose. Every other default check runs (not_a_server_error,
# status_code / content_type / response_schema / response_headers conformance,
# negative_data_rejection, ...).
EXCLUDED = [positive_data_acceptance]
# Findings still open: (operation (mode), check title, status) pairs tolerated here.
KNOWN: set[tuple[str, str, int]] = set()


@pytest.mark.timeout(180)
def test_no_5xx_and_responses_conform(redis_url: str) -> None:
    """Every operation, ``MAX_EXAMPLES`` generated cases each (schemathesis' own pytest
    loader, ``from_fixture``, breaks on pytest 9: it reads ``node._nodeid``; so the
    operations are driven here with their hypothesis strategies)."""
    # A live worker's heartbeat, so /readyz is ready (its 503 means "no worker", by design).
    info = WorkerInfo("st-worker", "demo", 8, "cpu", time.time())
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(DEFAULT_KEYS.worker(info.worker_id), info.to_json(), px=600_000)
        client.zadd(DEFAULT_KEYS.workers, {info.worker_id: time.time()})
    finally:
        client.close()
    app = create_app(Settings(redis_url=redis_url))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases: Counter[str] = Counter()
    server_errors: list[str] = []
    found: dict[tuple[str, str, int], str] = {}
    for result, mode in itertools.product(schema.get_all_operations(), list(GenerationMode)):
        try:
            _drive(result.ok(), mode, cases, server_errors, found)
        except Unsatisfiable:  # nothing invalid to generate (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE
    total = sum(cases.values())
    log.info("schemathesis: %d cases over %d operations: %s", total, len(cases), dict(cases))
    assert total >= 300, dict(cases)
    assert server_errors == [], server_errors
    for (label, title, _status), example in sorted(found.items()):
        log.warning("%s: %s: %s", label, title, example)
    assert set(found) <= KNOWN, found


def _drive(
    operation: Any,
    mode: GenerationMode,
    cases: Counter[str],
    server_errors: list[str],
    found: dict[tuple[str, str, int], str],
) -> None:
    """Up to MAX_EXAMPLES generated cases of one operation; record 5xx and failed checks."""
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        cases[label] += 1
        response = case.call()
        if response.status_code >= 500:
            server_errors.append(f"{label}: {response.status_code} {response.text[:300]}")
            return
        try:
            case.validate_response(response, excluded_checks=EXCLUDED)
        except FailureGroup as group:
            for failure in group.exceptions:
                found.setdefault(
                    (label, failure.title, response.status_code),
                    f"{response.status_code} {response.text[:200]}: {failure.message}"[:500],
                )
        except Failure as failure:
            found.setdefault(
                (label, failure.title, response.status_code),
                f"{response.status_code} {response.text[:200]}: {failure.message}"[:500],
            )

    run()
