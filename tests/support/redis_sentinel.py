"""A private Sentinel deployment for the tests: a primary, a replica and three sentinels
(redis-server in sentinel mode: no other binary), on free ports, with a short
down-after so that a killed primary is replaced within a test's patience."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support import free_port
from tests.support.redis_server import RedisServer

SERVICE = "proxy-primary"
DOWN_AFTER_MS = 1000


class RedisSentinels:
    def __init__(self, workdir: Path) -> None:
        (workdir / "primary").mkdir()
        (workdir / "replica").mkdir()
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(
            workdir / "replica", args=("--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            conf = workdir / f"sentinel-{port}.conf"  # sentinel rewrites it: its own file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [self.primary.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.wait_for(lambda: self._replica_seen() and self._in_sync(self.replica))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def primary_port(self) -> int | None:
        """The primary the sentinels name now."""
        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            host_port = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
            )
        except redis.RedisError:
            return None
        finally:
            client.close()
        return int(host_port[1]) if host_port else None

    def _replica_seen(self) -> bool:
        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False
        finally:
            client.close()
        return bool(replicas)

    @staticmethod
    def _in_sync(node: RedisServer) -> bool:
        client = node.client()
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the Sentinel deployment did not get there")
            time.sleep(0.1)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
            sentinel.wait()
        self.primary.kill()
        self.replica.kill()
