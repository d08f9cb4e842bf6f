"""A private Redis Cluster for the tests: 3 primaries and 3 replicas on free ports,
made with ``redis-cli --cluster create``, whose nodes a test may kill and restart.

A node's cluster bus listens on its port + 10000, so a node's port is picked below
55535 with both ports free. The node timeout is short (1 s) so that a replica takes
over a killed primary within a test's patience.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from bench.procs import cluster_port
from tests.support.redis_server import RedisServer, Tls

NODE_TIMEOUT_MS = 1000


def cluster_ports(count: int) -> list[int]:
    """Distinct ports whose bus port (+10000) is free too, all below 55535."""
    ports: list[int] = []
    while len(ports) < count:
        port = cluster_port()  # the bench's own pick (bench/procs.py)
        if port not in ports:
            ports.append(port)
    return ports


class RedisCluster:
    def __init__(
        self,
        workdir: Path,
        primaries: int = 3,
        replicas: int = 1,
        password: str = "",
        tls: Tls | None = None,
    ) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("no redis-cli on PATH (Debian's redis-tools)")
        ports = cluster_ports(primaries * (1 + replicas))
        self.nodes: list[RedisServer] = []
        for port in ports:
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir()
            config = str(node_dir / "nodes.conf")
            timeout = str(NODE_TIMEOUT_MS)
            args: tuple[str, ...] = ("--cluster-enabled", "yes", "--cluster-config-file", config)
            args = (*args, "--cluster-node-timeout", timeout)
            if password:  # a replica authenticates to its primary with the same one
                args = (*args, "--masterauth", password)
            node = RedisServer(node_dir, password=password, args=args, port=port, tls=tls)
            self.nodes.append(node)
        nodes = [f"127.0.0.1:{p}" for p in ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-replicas", str(replicas)]
        if password:
            create += ["-a", password, "--no-auth-warning"]
        if tls is not None:
            create += ["--tls", "--cacert", str(tls.ca)]
        quiet = subprocess.DEVNULL
        subprocess.run(
            [*create, "--cluster-yes"], check=True, stdout=quiet, stderr=quiet, timeout=60
        )
        self.wait_until_ok()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def client(self) -> redis.RedisCluster:
        node = next(n for n in self.nodes if n.process is not None)
        return redis.RedisCluster(
            host="127.0.0.1", port=node.port, socket_timeout=5, **node.client_options()
        )

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Every running node sees the cluster as ok and agrees on every slot's owner,
        and every running replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        while True:
            if self._ok():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def _ok(self) -> bool:
        maps = []
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
                # A replica that never synced would never take over: it counts its
                # data as too old (cluster-replica-validity-factor).
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
                ranges = client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
                maps.append(sorted((s[0], s[1], s[2][1]) for s in ranges))
            except redis.RedisError:
                return False
            finally:
                client.close()
        return all(m == maps[0] for m in maps) and sum(e - s + 1 for s, e, _ in maps[0]) == 16384

    def owner(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        client = self.client()
        try:
            port = client.nodes_manager.get_node_from_slot(key_slot(key.encode())).port
        finally:
            client.close()
        return next(n for n in self.nodes if n.port == port)

    def primaries(self) -> list[RedisServer]:
        """The running nodes that serve slots now."""
        found = []
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                if client.info("replication").get("role") == "master":
                    found.append(node)
            finally:
                client.close()
        return found

    def flushall(self) -> None:
        for node in self.primaries():
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()

    def move_slot(
        self, key: str, *, finish: bool = True, only: tuple[str, ...] = ()
    ) -> RedisServer:
        """Migrate ``key``'s slot (and the keys in it) to another primary, as
        ``redis-cli --cluster reshard`` does; with ``finish=False`` stop halfway: the
        keys are on the target, the slot still MIGRATING on the source; ``only``: move
        those keys and no other. Returns the target."""
        source = self.owner(key)
        target = next(n for n in self.primaries() if n.port != source.port)
        slot = key_slot(key.encode())
        src, dst = source.client(), target.client()
        try:
            src_id, dst_id = src.cluster("myid"), dst.cluster("myid")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
            while keys := only or src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):  # type: ignore[no-untyped-call]
                src.execute_command(  # type: ignore[no-untyped-call]
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                )
                if only:
                    break
            if finish:
                for node in self.primaries():
                    client = node.client()
                    try:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]
                    finally:
                        client.close()
        finally:
            src.close()
            dst.close()
        return target

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
