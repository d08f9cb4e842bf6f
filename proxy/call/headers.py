"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from collections.abc import Set as AbstractSet

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.call.record import CallRecord
from proxy.config.model import Provider
from proxy.config.teams import SCOPING_HEADERS
from proxy.errors import InvalidRequest

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
    )
)

# Client headers the upstream must not see: the client's credentials for the proxy,
# headers the transport sets for the new request, and forwarding headers a client
# could use to pose as someone else.
NOT_TO_UPSTREAM = HOP_BY_HOP | {
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "host",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}


@functools.cache
def not_forwarded(allowed: frozenset[str]) -> frozenset[str]:
    """The client headers a team's calls drop: the scoping ones it may not set, too.
    Cached: one set per distinct ``client_headers`` list, not one per call."""
    return NOT_TO_UPSTREAM | (SCOPING_HEADERS - allowed)


# Upstream headers the client must not see: aiohttp sets its own framing, date and
# server, and the body it relays is already decoded.
_NOT_TO_CLIENT = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "date",
    "server",
    "set-cookie",
}


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    listed = headers.get("Connection")
    if not listed:
        return set()
    return {name.strip().lower() for name in listed.split(",") if name.strip()}


def upstream_headers(
    client: CIMultiDictProxy[str] | CIMultiDict[str],
    provider: Provider,
    extra: Mapping[str, str] | None = None,
    dropped: AbstractSet[str] = NOT_TO_UPSTREAM,
) -> CIMultiDict[str]:
    """``dropped``: the client headers not forwarded (``not_forwarded`` for a team)."""
    listed = _connection_listed(client)
    drop = dropped | listed if listed else dropped  # no new set per call
    out = _kept(client, drop)
    for name, value in provider.headers.items():
        out[name] = value
    for name, value in (extra or {}).items():
        out[name] = value
    if provider.api_key:
        out["Authorization"] = f"Bearer {provider.api_key}"
    # The proxy reads usage from the bodies it relays, so it asks for them unencoded.
    out["Accept-Encoding"] = "identity"
    out["Content-Type"] = "application/json"
    return out


def client_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's x-ratelimit-* describe the proxy's shared provider account, not the
    caller's limits; the proxy sends its own per team instead."""
    listed = _connection_listed(upstream)
    drop = _NOT_TO_CLIENT | listed if listed else _NOT_TO_CLIENT
    return _kept(upstream, drop, ("x-ratelimit-",))


def _kept(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: AbstractSet[str],
    prefix: tuple[str, ...] = (),
) -> CIMultiDict[str]:  # fmt: skip
    """The headers whose lower-case name is not in ``drop`` and does not start with
    one of ``prefix``. A list, not a generator: multidict builds from a generator at a third of
    the speed (measured), and this runs twice per call."""
    kept = []
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith(prefix):
            kept.append((name, value))
    return CIMultiDict(kept)


def check_forwardable(client: Mapping[str, str], dropped: AbstractSet[str]) -> None:
    """400 for a client header to forward whose value is not UTF-8. aiohttp reads a
    header's bytes as UTF-8, a byte that is not as a surrogate escape, and such a value
    cannot be written to the upstream as the client sent it. Checked before admission,
    so the refused call takes nothing from the team's limits."""
    for name, value in client.items():
        if not value.isascii() and name.lower() not in dropped:
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidRequest(
                    f"The value of header '{name}' is not valid UTF-8; send ASCII header values."
                ) from None


def name_the_call(headers: CIMultiDict[str], record: CallRecord) -> None:
    """Every answer names the call it belongs to and carries the team's x-ratelimit-*.
    Set where each response is made (not in an on_response_prepare signal, which cost
    a coroutine per response): the middleware for whole answers, the relay for streams."""
    headers["X-Proxy-Request-Id"] = record.request_id
    if record.rate_headers:
        headers.update(record.rate_headers)
