"""The default static member id (`kafka.group_instance_id`): stable across restarts,
distinct between workers.

Why the host name: on Kubernetes it is the pod name, which survives a container
restart (crash, OOM kill), so the restarted worker rejoins as the same member and
gets its partitions back at once. Two workers on one host (a VM, a laptop, the test
suite) would share it, and the second to join would fence the first; so each worker
also takes the first free slot among lock files named after the group, and every
worker after the first on a host is `<host>-<n>`. The kernel drops a dead process's
lock, so a worker restarted after `kill -9` takes its old slot, hence its old id,
again. Different users' or containers' temp directories do not share slots: those
workers need an explicit id, and a collision is reported as fencing, not hidden.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path

MAX_SLOTS = 64


class InstanceSlot:
    """The id, and the lock that reserves it for the life of this process."""

    def __init__(self, instance_id: str, fd: int | None) -> None:
        self.instance_id = instance_id
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def default_instance_id(group_id: str, host: str | None = None,
                        lock_dir: Path | None = None) -> InstanceSlot:
    """`<host>` or `<host>-<n>` for the n-th other live worker of this group here."""
    host = host or socket.gethostname() or "envoygeo"
    lock_dir = lock_dir or Path(tempfile.gettempdir())
    safe_group = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)[:100]
    for n in range(MAX_SLOTS):
        path = lock_dir / f"envoygeo-{safe_group}.member-{n}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue  # e.g. another user's file: not ours to take
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live worker holds this slot
        return InstanceSlot(host if n == 0 else f"{host}-{n}", fd)
    # No slot to be had: the bare host name; a collision then shows up as fencing.
    return InstanceSlot(host, None)
