"""Results in S3-compatible object storage (boto3, run in threads).

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles); the region from
``AWS_DEFAULT_REGION`` (default ``us-east-1``). Expiry: a bucket lifecycle rule expiring
the prefix after ``result_ttl_s`` rounded up to days is the cheap way; the workers' sweep
(:meth:`S3Results.sweep`) removes objects older than ``result_ttl_s`` as well.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.results.base import INPUTS, ResultStore, ResultStoreError

T = TypeVar("T")


class S3Results(ResultStore):
    """Objects ``{prefix}/{job}/{lease}-{i}.{fmt}`` in ``bucket``."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        if not bucket:
            raise ValueError("s3:// result store needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=3, read_timeout=10
            ),
        )

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ResultStoreError(f"S3 {fn.__name__}: {exc}") from exc

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        await self._call(self.client.put_object, Key=self._key(name), Body=data,
                         ContentType=content_type)  # fmt: skip

    async def get(self, name: str) -> bytes | None:
        def read(**kwargs: Any) -> bytes | None:
            try:
                return bytes(self.client.get_object(**kwargs)["Body"].read())
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return await self._call(read, Key=self._key(name))

    async def delete(self, names: Sequence[str]) -> None:
        for start in range(0, len(names), 1000):  # DeleteObjects takes up to 1000 keys
            objects = [{"Key": self._key(n)} for n in names[start : start + 1000]]
            await self._call(self.client.delete_objects, Delete={"Objects": objects})

    async def sweep(self, older_than_s: float, inputs_older_than_s: float | None = None) -> int:
        now = dt.datetime.now(dt.timezone.utc)
        cutoff = now - dt.timedelta(seconds=older_than_s)
        inputs_cutoff = (
            None if inputs_older_than_s is None else now - dt.timedelta(seconds=inputs_older_than_s)
        )
        inputs = self._key(INPUTS + "/")

        def old(key: str, modified: dt.datetime) -> bool:
            if key.startswith(inputs):
                return inputs_cutoff is not None and modified < inputs_cutoff
            return modified < cutoff

        def old_keys(**kwargs: Any) -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(**kwargs)
            return [
                o["Key"]
                for page in pages
                for o in page.get("Contents", [])
                if old(o["Key"], o["LastModified"])
            ]

        keys = await self._call(old_keys, Prefix=self.prefix)
        names = [k.removeprefix(self.prefix) for k in keys]
        await self.delete(names)
        return len(names)

    def presigned_url(self, name: str, ttl_s: int) -> str | None:
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)},
                ExpiresIn=max(1, ttl_s),
            )
        )  # fmt: skip
