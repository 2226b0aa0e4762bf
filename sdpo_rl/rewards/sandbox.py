"""Run an untrusted Python program under limits, in its own process group, scratch directory and environment.

Every run gets: a wall-clock timeout that kills the whole process group; address-space, CPU-time, file-size and
(for a dropped user) process-count limits; a cap on the bytes read from stdout and stderr together; a fresh
temporary working directory, removed afterwards; an environment with none of the parent's variables; and, when the
trainer runs as root, an unprivileged user (`nobody` by default). With bubblewrap (`bwrap`) installed and working,
the program also runs in its own mount, PID and network namespaces: it sees only the interpreter and system
libraries (read-only) and its working directory, and has no network. docs/rewards.md ("Security") says what is and
is not contained in each setting. Linux only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from .bwrap import SYSTEM_PATHS, bwrap_arguments
from .child_process import kill_group, read_bounded

logger = logging.getLogger(__name__)

HARNESS_SOURCE = (Path(__file__).parent / "_harness.py").read_text()
INTERPRETER_FLAGS = ("-I", "-B", "-X", "utf8")  # isolated mode (no PYTHON* variables, no user site), no .pyc writes
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
NOBODY = (65534, 65534)
TRIAL_TIMEOUT_S = 60.0
PREFIXES_QUERY = (
    "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
)


@dataclass(frozen=True)
class Limits:
    """What one run of a program may use. `max_processes` applies only when privileges are dropped (see
    `resource_limits`)."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_output_bytes: int = 1_000_000
    max_file_bytes: int = 16_000_000
    max_processes: int = 256

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_output_bytes", "max_file_bytes", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb} is too small to start Python; use at least 64.")


class RunResult(NamedTuple):
    """What a run produced. `report` is the runner's verdict on the program (None: the program never reached the
    end of the runner, e.g. killed or `os._exit`); `stderr` excludes the report line; a negative `returncode` -N
    means the program died of signal N."""

    stdout: bytes
    stderr: bytes
    report: dict[str, Any] | None
    returncode: int | None
    timed_out: bool
    output_exceeded: bool
    elapsed_s: float


def resource_limits(limits: Limits, drops_privileges: bool) -> dict[str, int]:
    """The rlimits the runner sets (soft = hard, so the program cannot raise them).

    RLIMIT_NPROC counts every process of the user, so it is only set for the unprivileged user the program runs as:
    for the trainer's own user it would also count the trainer's threads.
    """
    limits_by_name = {
        "RLIMIT_AS": int(limits.memory_mb) * 1024 * 1024,
        "RLIMIT_CPU": int(limits.timeout_s) + 1,  # a backstop: the wall-clock timeout normally ends the run first
        "RLIMIT_FSIZE": int(limits.max_file_bytes),
        "RLIMIT_CORE": 0,
    }
    if drops_privileges:
        limits_by_name["RLIMIT_NPROC"] = int(limits.max_processes)
    return limits_by_name


def scrubbed_environment(workdir: str) -> dict[str, str]:
    """The program's whole environment: nothing of the trainer's (API keys, tokens) is passed on."""
    return {"PATH": CHILD_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def encode_request(request: dict[str, Any], stdin: bytes) -> bytes:
    """The runner's standard input: the request's length, a newline, the request as JSON, then the program's input."""
    header = json.dumps(request).encode()
    return str(len(header)).encode() + b"\n" + header + stdin


def split_report(stderr: bytes, nonce: str) -> tuple[dict[str, Any] | None, bytes]:
    """Separate the runner's report line (the last one marked with `nonce`) from the program's own stderr."""
    marker = b"\n" + nonce.encode()
    position = stderr.rfind(marker)
    if position < 0:
        return None, stderr
    line = stderr[position + len(marker) :].split(b"\n", 1)[0]
    try:
        report = json.loads(line)
    except ValueError:
        return None, stderr
    return (report if isinstance(report, dict) else None), stderr[:position]


def unreachable_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The first directory above `path` (symlinks resolved) that user `uid`/`gid` may not enter, or None."""
    for directory in reversed(Path(os.path.realpath(path)).parents):
        info = directory.stat()
        if info.st_uid == uid:
            search_bit = stat.S_IXUSR
        elif info.st_gid == gid:
            search_bit = stat.S_IXGRP
        else:
            search_bit = stat.S_IXOTH
        if not info.st_mode & search_bit:
            return f"{directory} (mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid})"
    return None


def remove_tree(path: str) -> None:
    """Delete a scratch directory. The program may have made parts of it unreadable: root ignores that; another
    user first gives itself access back. Symlinks are never followed (they may point anywhere)."""
    if os.geteuid() != 0:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for directory, subdirectories, _ in os.walk(path):
            for name in subdirectories:
                subdirectory = os.path.join(directory, name)
                if not os.path.islink(subdirectory):
                    with contextlib.suppress(OSError):
                        os.chmod(subdirectory, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        logger.warning("Could not remove the sandbox directory %s.", path)


class Sandbox:
    """Runs programs with `limits`; thread-safe. Settings:

    - `python_executable`: the interpreter that runs the programs (default: the trainer's own), started as
      `python -I` (isolated mode);
    - `unprivileged_ids`: the (uid, gid) programs run as when the trainer runs as root (default: nobody); None keeps
      root (then nothing on the machine is protected from the program);
    - `use_bwrap`: None uses bubblewrap when it is installed and works (checked once, with a warning when not);
      True requires it; False never uses it.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        python_executable: str | None = None,
        unprivileged_ids: tuple[int, int] | None = NOBODY,
        use_bwrap: bool | None = None,
    ):
        if not sys.platform.startswith("linux"):
            raise RuntimeError(
                f"The code sandbox needs Linux (process groups, rlimits, namespaces); this is {sys.platform!r}. "
                "Run the trainer in a Linux container or WSL."
            )
        if use_bwrap not in (None, True, False):
            raise ValueError(f"use_bwrap must be None (automatic), True or False, got {use_bwrap!r}.")
        if unprivileged_ids is not None and (
            not isinstance(unprivileged_ids, (tuple, list))
            or len(unprivileged_ids) != 2
            or not all(isinstance(i, int) and i > 0 for i in unprivileged_ids)
        ):
            raise ValueError(
                f"unprivileged_ids must be a (uid, gid) pair of positive ints such as (65534, 65534), or None; "
                f"got {unprivileged_ids!r}."
            )
        self.limits = limits or Limits()
        self.python_executable = python_executable or sys.executable
        if not (os.path.isfile(self.python_executable) and os.access(self.python_executable, os.X_OK)):
            raise ValueError(
                f"python_executable={self.python_executable!r} is not an executable file; pass the path of a Python "
                "interpreter (None: the trainer's own)."
            )
        self.use_bwrap = use_bwrap
        self.drop_to = tuple(unprivileged_ids) if unprivileged_ids is not None and os.geteuid() == 0 else None
        self._isolation: str | None = None
        self._bwrap: str | None = None
        self._read_only_paths: list[str] = []
        self._lock = threading.Lock()

    @property
    def isolation(self) -> str:
        """Which sandbox runs the programs: "bwrap" (namespaces, see the module docstring) or "process" (limits,
        scratch directory and user only). Chosen on first use by running a trivial program."""
        with self._lock:
            if self._isolation is None:
                self._isolation = self._choose_isolation()
            return self._isolation

    def run(self, code: str, stdin: str = "", assertion: str | None = None) -> RunResult:
        """Run `code` as `__main__` with `stdin` as its input, then `assertion` (a test statement) if given."""
        return self._execute(self.isolation, self.limits, code, stdin.encode(), assertion)

    def _choose_isolation(self) -> str:
        bwrap_problem = None
        if self.use_bwrap is not False:
            self._bwrap = shutil.which("bwrap")
            if self._bwrap is None:
                bwrap_problem = "bubblewrap (`bwrap`) is not installed"
            else:
                self._read_only_paths = [*SYSTEM_PATHS, *self._interpreter_paths()]
                bwrap_problem = self._trial_problem("bwrap")
                if bwrap_problem is None:
                    return "bwrap"
                bwrap_problem = f"bubblewrap does not work here: {bwrap_problem}"
            if self.use_bwrap:
                raise RuntimeError(
                    f"use_bwrap=True, but {bwrap_problem}. Install bubblewrap (e.g. `apt-get install bubblewrap`) "
                    "or pass use_bwrap=None to run programs without namespaces (see docs/rewards.md, Security)."
                )
        process_problem = self._trial_problem("process")
        if process_problem is not None:
            raise RuntimeError(self._process_failure_message(process_problem))
        if bwrap_problem is not None:
            logger.warning(
                "Running programs without bubblewrap (%s): they can use the network and read every world-readable "
                "file. See docs/rewards.md, Security.",
                bwrap_problem,
            )
        return "process"

    def _process_failure_message(self, problem: str) -> str:
        if self.drop_to is None:
            return f"The sandbox cannot run {self.python_executable}: {problem}"
        uid, gid = self.drop_to
        blocked = [
            f"{directory} is not searchable by that user"
            for directory in (
                unreachable_ancestor(self.python_executable, uid, gid),
                unreachable_ancestor(os.path.join(tempfile.gettempdir(), "run"), uid, gid),
            )
            if directory is not None
        ]
        where = f" ({'; '.join(blocked)})" if blocked else ""
        return (
            f"Programs cannot run as uid {uid} with {self.python_executable}: {problem}{where}. Fixes: install "
            f"bubblewrap (`apt-get install bubblewrap`), which shows the interpreter to that user; or pass "
            f"python_executable= an interpreter uid {uid} can read (e.g. /usr/bin/python3), with TMPDIR in a "
            "directory it can reach; or unprivileged_ids=None to run programs as root (then nothing is protected "
            "from them)."
        )

    def _interpreter_paths(self) -> list[str]:
        """The interpreter's prefixes (stdlib, site-packages) and directory, as given and with symlinks resolved."""
        try:
            completed = subprocess.run(
                [self.python_executable, "-I", "-c", PREFIXES_QUERY],
                capture_output=True,
                text=True,
                timeout=TRIAL_TIMEOUT_S,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise RuntimeError(f"python_executable={self.python_executable!r} does not run: {error}") from error
        paths = [*json.loads(completed.stdout), os.path.dirname(os.path.abspath(self.python_executable))]
        return sorted({variant for path in paths for variant in (path, os.path.realpath(path))})

    def _trial_problem(self, isolation: str) -> str | None:
        """Why a trivial program fails under `isolation`, or None when it works."""
        try:
            result = self._execute(isolation, replace(self.limits, timeout_s=TRIAL_TIMEOUT_S), "print('ok')", b"", None)
        except OSError as error:
            return str(error)
        if result.report == {"status": "ok"} and result.stdout == b"ok\n":
            return None
        detail = result.stderr.decode(errors="replace").strip()[-500:] or f"exit status {result.returncode}"
        return f"a trivial program failed ({detail})"

    def _execute(self, isolation: str, limits: Limits, code: str, stdin: bytes, assertion: str | None) -> RunResult:
        nonce = secrets.token_hex(16)
        request = {
            "nonce": nonce,
            "code": code,
            "assertion": assertion,
            "limits": resource_limits(limits, drops_privileges=self.drop_to is not None),
            "drop_to": self.drop_to if isolation == "bwrap" else None,
        }
        runner = [self.python_executable, *INTERPRETER_FLAGS, "-c", HARNESS_SOURCE]
        as_user = {}
        if self.drop_to is not None and isolation == "process":
            as_user = {"user": self.drop_to[0], "group": self.drop_to[1], "extra_groups": []}
        workdir = tempfile.mkdtemp(prefix="sdpo-sandbox-")
        try:
            if self.drop_to is not None:
                os.chown(workdir, *self.drop_to)
            command = runner
            if isolation == "bwrap":
                command = bwrap_arguments(self._bwrap, self._read_only_paths, workdir, os.geteuid() == 0) + runner
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(encode_request(request, stdin))
                stdin_file.seek(0)
                started = time.monotonic()
                with subprocess.Popen(
                    command,
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env=scrubbed_environment(workdir),
                    start_new_session=True,
                    **as_user,
                ) as process:
                    try:
                        captured = read_bounded(process, started + limits.timeout_s, limits.max_output_bytes)
                    finally:
                        kill_group(process.pid)
                elapsed = time.monotonic() - started
        finally:
            remove_tree(workdir)
        report, stderr = split_report(captured.stderr, nonce)
        returncode = process.returncode
        if isolation == "bwrap" and returncode > 128:  # bubblewrap exits with 128 + N when its child dies of signal N
            returncode = 128 - returncode
        return RunResult(
            captured.stdout, stderr, report, returncode, captured.timed_out, captured.output_exceeded, elapsed
        )
