"""Script calls gathered per loop turn: one command and one Lua run for many callers.

Under load many calls of one team reach the limiter in the same loop turn, and a
script run costs Redis more in its fixed part (the command, TIME, reading and writing
each limit's state) than in the work of one call: with 12 calls a turn (what a worker
sees at concurrency 64), Redis spent ~45 µs of CPU per proxied call running them one
by one. A batch gathers the calls to one script of one ordering domain (a team) made
in one turn and is encoded when the turn's commands are written: one EVALSHA, whose
reply is the array of every caller's reply, in order. The scripts take the calls in
order, each seeing what the ones before it took, so a batch decides what the same
calls run one after another would.

A domain's commands keep the order they were made in: a call joins the domain's open
batch only if that batch is the domain's last command of the turn; a call to another
script (a settlement after an admission) opens a new batch behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.redis.protocol import Reply, RespError, Script

MAX_CALLS = 64  # per batch: Lua's unpack() and the reply stay small


class Receiver(Protocol):
    """What waits for one reply on a connection: a caller's future, or a batch."""

    def done(self) -> bool: ...

    def set_result(self, reply: Reply, /) -> None: ...

    def set_exception(self, exc: BaseException, /) -> None: ...


@dataclass(frozen=True)
class BatchShape:
    """What a batch's calls share, encoded once (per team and checks): the script and
    the keys and arguments in front of the calls' own. The script reads ``ARGV[1]``,
    the number of calls, to find where each call's keys and arguments are."""

    script: Script
    keys: bytes
    key_count: int
    args: bytes  # after the call count
    arg_count: int
    call_keys: int  # keys each call adds, after the shared ones
    call_args: int  # arguments each call adds, after the shared ones


# Sends a command for a receiver on the batch's connection (an EVAL after NOSCRIPT).
Resend = Callable[[bytes, Receiver], None]


class Batch:
    __slots__ = ("_args", "_futures", "_keys", "_loop", "_resend", "_retried", "shape")

    def __init__(self, shape: BatchShape, loop: asyncio.AbstractEventLoop, resend: Resend) -> None:
        self.shape = shape
        self._loop = loop  # not get_running_loop() per call: on 3.11 it costs a getpid()
        self._resend = resend
        self._keys: list[bytes] = []
        self._args: list[bytes] = []
        self._futures: list[asyncio.Future[Reply]] = []
        self._retried = False

    def add(self, keys: bytes, args: bytes) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._keys.append(keys)
        self._args.append(args)
        self._futures.append(future)
        return future

    def full(self) -> bool:
        return len(self._futures) >= MAX_CALLS

    def encode(self, by_body: bool = False) -> bytes:
        shape, calls = self.shape, len(self._futures)
        key_count = shape.key_count + shape.call_keys * calls
        items = 2 + key_count + shape.arg_count + shape.call_args * calls
        script = shape.script.by_body if by_body else shape.script.by_sha
        return b"".join(
            (
                b"*%d\r\n" % (items + 2),
                script,
                _number(key_count),
                shape.keys,
                *self._keys,
                _number(calls),
                shape.args,
                *self._args,
            )
        )

    # The Receiver side: the connection hands the batch its one reply.

    def done(self) -> bool:
        for future in self._futures:  # noqa: SIM110 - no generator: this runs per reply
            if not future.done():
                return False
        return True

    def set_result(self, reply: Reply) -> None:
        if not isinstance(reply, list) or len(reply) != len(self._futures):
            return self.set_exception(
                RespError(f"a batch of {len(self._futures)} calls got the reply {reply!r:.200}")
            )
        for future, own in zip(self._futures, reply, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(own, RespError):
                future.set_exception(own)
            else:
                future.set_result(own)

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, RespError) and exc.message.startswith("NOSCRIPT") and not self._retried:
            # Redis lost its script cache (a restart, SCRIPT FLUSH); EVAL fills it again.
            self._retried = True
            try:
                return self._resend(self.encode(by_body=True), self)
            except ConnectionError as broken:
                exc = broken
        for future in self._futures:
            if not future.done():
                # One exception object per caller: each raises it with its own traceback.
                future.set_exception(type(exc)(*exc.args))


def _number(n: int) -> bytes:
    """``n`` as a bulk string (``encode_items((n,))``, without its generality)."""
    digits = b"%d" % n
    return b"$%d\r\n%b\r\n" % (len(digits), digits)
