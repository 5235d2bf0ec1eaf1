"""Where finished images live: in Redis (the default), in a directory, or in S3.

``LDMSERVE_RESULT_STORE`` picks one:

- ``redis`` — the images go into the job's ``P:job:{id}:images`` hash inside the guarded
  FINISH script (the embedded set-up; every 512×512 PNG is ~0.4 MB of Redis memory);
- ``file:///path`` — a directory every API and worker process mounts (a shared volume);
- ``s3://bucket/prefix`` — S3-compatible object storage (AWS S3, MinIO, SeaweedFS, GCS's
  S3 interface), endpoint ``LDMSERVE_S3_ENDPOINT_URL`` for a non-AWS one, credentials from
  the standard AWS variables / files (boto3's chain).

With a store the worker writes the objects first and the FINISH script stores only their
names (``results`` in the job hash); a refused finish (stale lease) deletes them again.
Object names carry the lease, so a stale worker can never overwrite the current one's.
"""

from __future__ import annotations

from service.results.base import ResultStore, ResultStoreError, object_name
from service.settings import Settings

__all__ = ["ResultStore", "ResultStoreError", "object_name", "open_result_store"]


def open_result_store(settings: Settings) -> ResultStore | None:
    """The configured store; None for ``redis`` (images inline in the FINISH script)."""
    spec = settings.result_store
    if spec == "redis":
        return None
    if spec.startswith("file://"):
        from service.results.files import FileResults

        return FileResults(spec.removeprefix("file://"))
    if spec.startswith("s3://"):
        from service.results.s3 import S3Results  # boto3: imported only when configured

        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        return S3Results(bucket, prefix, endpoint_url=settings.s3_endpoint_url)
    raise ValueError(f"unknown result store {spec!r}")
