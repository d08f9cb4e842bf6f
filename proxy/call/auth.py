"""Step 1 of a call: which team, and which of its keys, is calling. Keys are stored only
as SHA-256 hashes.

The presented key is hashed and the digest looked up. Timing can then reveal at most
something about a digest, which says nothing usable about any key, so the lookup is
as good as a constant-time comparison without being linear in the number of keys.
A key's expiry is read on the clock at each call, not when the file was loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping

from proxy.call.record import CallRecord
from proxy.config.model import Config
from proxy.config.teams import KEY_PREFIX, expiry_text
from proxy.errors import AdminOnly, InvalidApiKey


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authenticate(
    headers: Mapping[str, str], config: Config, record: CallRecord, clock: Callable[[], float]
) -> None:
    """Name the caller on ``record``: its team and the name of its key (``anonymous`` and
    None when routes.yaml configures no team at all). ``clock`` is the wall clock keys
    expire by. An expired key is named on the record too before it is refused, so that
    the access log shows who still uses it."""
    if not config.teams:
        return  # the record's team is anonymous already
    key = bearer(headers)
    if key is None:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    if not key.isascii():  # keys are ASCII; and the message must not echo a stray byte
        raise InvalidApiKey("Incorrect API key provided: it is not ASCII.")
    found = config.key_index.get(key_hash(key))
    if found is None:
        raise InvalidApiKey(f"Incorrect API key provided: {_redacted(key)}.")
    record.team, record.key = found.team, found.name
    if found.expires is not None and clock() >= found.expires:
        raise InvalidApiKey(
            f"The API key '{found.name}' of team '{found.team}' expired at "
            f"{expiry_text(found.expires)}. Ask for a new key."
        )


def require_admin(headers: Mapping[str, str], config: Config) -> None:
    if not config.admin_key:
        raise AdminOnly("The admin endpoints are off: set admin_key in routes.yaml.")
    key = bearer(headers) or ""
    # aiohttp decodes a header's bytes as UTF-8 with surrogateescape: encoding them back
    # the same way compares the very bytes sent, and never fails on a byte that is not.
    presented, admin_key = (k.encode(errors="surrogateescape") for k in (key, config.admin_key))
    if not hmac.compare_digest(presented, admin_key):
        raise AdminOnly("This endpoint needs the admin key as 'Authorization: Bearer KEY'.")


def _redacted(key: str) -> str:
    return key[:4] + "*" * 4 + key[-2:] if len(key) > 8 else "****"
