"""Ask the kernel to signal a process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

It holds even when the parent is killed with SIGKILL and cannot clean up after itself,
which is how neither a worker nor a local engine outlives the proxy that started it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int) -> Callable[[], None]:
    """Made in the parent, called in the child (also as a ``preexec_fn``).

    libc's ``prctl`` is looked up here, before the fork, so that the child runs nothing
    but two system calls: after a fork only async-signal-safe calls are sure to work.
    """
    parent_pid = os.getpid()
    if sys.platform != "linux":
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        # The parent may have died before prctl took effect: then nobody would ever
        # send the signal, so act now.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signum)

    return in_child
