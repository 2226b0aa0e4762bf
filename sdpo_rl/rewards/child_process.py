"""Watch a child process: read its output with a cap and a deadline, and kill its whole process group."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from typing import NamedTuple

POLL_INTERVAL_S = 0.05
READ_CHUNK_BYTES = 65536


class Captured(NamedTuple):
    """What `read_bounded` read, and whether it stopped at the deadline or at the output cap."""

    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_exceeded: bool


def has_exited(pid: int) -> bool:
    """Whether child `pid` has ended, without reaping it (its process group id stays reserved until we kill it)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_bounded(process: subprocess.Popen, deadline: float, max_bytes: int) -> Captured:
    """Read stdout and stderr as they come until the program ends, `deadline` passes, or together they exceed
    `max_bytes`: memory stays bounded whatever the program prints. Once the process itself has exited, what is
    left in the pipes is read and the rest (children still holding the pipes) is not waited for."""
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    stdout, stderr = buffers.values()
    total = 0
    leader_exited = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Captured(bytes(stdout), bytes(stderr), timed_out=True, output_exceeded=False)
            ready = selector.select(0 if leader_exited else min(remaining, POLL_INTERVAL_S))
            if leader_exited and not ready:
                break
            for key, _ in ready:
                chunk = os.read(key.fd, READ_CHUNK_BYTES)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                total += len(chunk)
                if total > max_bytes:
                    return Captured(bytes(stdout), bytes(stderr), timed_out=False, output_exceeded=True)
            leader_exited = leader_exited or has_exited(process.pid)
    return Captured(bytes(stdout), bytes(stderr), timed_out=False, output_exceeded=False)
