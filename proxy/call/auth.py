"""Step 1 of a call: which team is calling. Keys are stored only as SHA-256 hashes.

The presented key is hashed and the digest looked up. Timing can then reveal at most
something about a digest, which says nothing usable about any key, so the lookup is
as good as a constant-time comparison without being linear in the number of keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from proxy.config.model import ANONYMOUS, Config
from proxy.errors import AdminOnly, InvalidApiKey
from proxy.limits.store import NO_KEY

KEY_PREFIX = "sk-proxy-"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authenticate(headers: Mapping[str, str], config: Config) -> str:
    """The team's name; ``anonymous`` when routes.yaml configures no team at all."""
    if not config.teams:
        return ANONYMOUS
    key = bearer(headers)
    if key is None:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    if not key.isascii():  # keys are ASCII; and the message must not echo a stray byte
        raise InvalidApiKey("Incorrect API key provided: it is not ASCII.")
    team = config.key_index.get(key_hash(key))
    if team is None:
        raise InvalidApiKey(f"Incorrect API key provided: {_redacted(key)}.")
    return team


def key_label(headers: Mapping[str, str], config: Config) -> str:
    """What the ledger splits a team's usage by: the first 12 hex digits of the key's
    hash, "-" without teams. Call it after ``authenticate``. Named keys will return the
    key's name here instead; the ledger takes whatever this returns."""
    if not config.teams:
        return NO_KEY
    return key_hash(bearer(headers) or "")[7:19]


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
