"""What ``redis.url`` names: the nodes to ask first (one node, or a Cluster's seeds), or
Sentinel's sentinels and the service whose primary they name (redis/router.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from proxy.redis.client import Address


@dataclass(frozen=True)
class Seeds:
    """What ``redis.url`` names: nodes to ask first, or sentinels and a service."""

    addresses: tuple[Address, ...]
    service: str = ""  # set: the addresses are sentinels
    node: Address | None = None  # what a node's URL adds to a host and port (TLS, auth, db)

    @classmethod
    def parse(cls, urls: Sequence[str]) -> Seeds:
        if len(urls) == 1 and urls[0].startswith(("redis+sentinel://", "rediss+sentinel://")):
            return cls._sentinel(urls[0])
        addresses = tuple(Address.from_url(url) for url in urls)
        return cls(addresses, node=addresses[0])

    @classmethod
    def _sentinel(cls, url: str) -> Seeds:
        """redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/db]; the
        password is the data node's (sentinels without one, as Debian ships them).
        rediss+sentinel://: TLS to the sentinels and to the nodes they name."""
        tls = url.startswith("rediss+")
        rest = url.partition("://")[2]
        netloc, _, path = rest.partition("/")
        credentials, _, hosts = netloc.rpartition("@")
        service, _, db = path.partition("/")
        if not service or not hosts:
            raise ValueError(f"a Sentinel URL names hosts and a service: {url!r}")
        sentinels = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":")
            sentinels.append(Address(host=name or port, port=int(port) if name else 26379, tls=tls))
        user, _, password = credentials.partition(":")
        node = Address(username=unquote(user), password=unquote(password), db=int(db or 0), tls=tls)
        return cls(tuple(sentinels), service=unquote(service), node=node)
