"""Fault injection, for the tests of what a crash, a full disk or a slow write leaves behind (tests/test_faults.py,
test_operator.py): each named point in the code (a checkpoint's windows, a step, a rotation) calls `at(name)`,
which does nothing unless VITFOOD_FAULT names that point. Production runs never set it.

    VITFOOD_FAULT=<point>[:<n>]          SIGKILL this process the n-th time (default 1st) it reaches <point>
    VITFOOD_FAULT=enospc:<point>[:<n>]   fail there as a full disk
    VITFOOD_FAULT=error:<point>[:<n>]    fail there with an error
    VITFOOD_FAULT=delay:<point>[:<n>]    sleep VITFOOD_FAULT_DELAY seconds (2) there
    VITFOOD_FAULT_RANK=<r>               only on rank r
"""

import errno
import os
import signal
import time

from vitfood.common import UserError

_reached = {}  # how often this process reached each point (tests clear it: conftest.fault_counts_from_zero)


def at(name):
    """Point `name`: what VITFOOD_FAULT asks for there, if it names it (see above); else nothing."""
    spec = os.environ.get("VITFOOD_FAULT", "")
    if not spec or os.environ.get("VITFOOD_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    parts = spec.split(":")
    kind = parts[0] if parts[0] in ("enospc", "error", "delay") else "kill"
    parts = parts[1:] if kind != "kill" else parts
    if parts[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(parts[1] if len(parts) > 1 else 1):
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "error":
            raise UserError(f"fault injected at {name} (VITFOOD_FAULT)")
        if kind == "delay":
            time.sleep(float(os.environ.get("VITFOOD_FAULT_DELAY", "2")))
            return
        os.kill(os.getpid(), signal.SIGKILL)
