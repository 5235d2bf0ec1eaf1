"""A real local Redis Cluster for tests: three primaries (redis-server --cluster-enabled),
joined by ``redis-cli --cluster create``, each on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from service.redis_server import find_redis_server, free_port


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ask(port: int, *command: str) -> object:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return client.execute_command(*command)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis needs it <= 55535."""
    while True:
        port = free_port()
        if port <= 55535 and _is_free(port + 10000):
            return port


class LocalCluster:
    """Three cluster-enabled redis-servers with every slot assigned; AOF off (throwaway)."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root = root
        self.ports = [cluster_port() for _ in range(nodes)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """Any node's URL (the first): clients learn the rest from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout_s: float = 30) -> LocalCluster:
        binary = str(find_redis_server())
        cli = shutil.which("redis-cli", path=str(Path(binary).parent)) or "redis-cli"
        for port in self.ports:
            data = self.root / str(port)
            data.mkdir(parents=True, exist_ok=True)
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000", "--appendonly", "no", "--save", "",
                    "--logfile", str(data / "redis.log")]  # fmt: skip
            self.processes.append(subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL))  # fmt: skip
        for port in self.ports:
            self._wait(lambda p=port: _ask(p, "PING"), timeout_s, "node up")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)  # fmt: skip
        for port in self.ports:
            self._wait(lambda p=port: b"cluster_state:ok" in _ask(p, "CLUSTER", "INFO"),
                       timeout_s, "cluster state ok")  # fmt: skip
        return self

    @staticmethod
    def _wait(check: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"local Redis Cluster: {what} not reached in {timeout_s}s")
            time.sleep(0.1)

    def flush(self) -> None:
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                client.flushall()
                client.script_flush()
            finally:
                client.close()

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes = []
