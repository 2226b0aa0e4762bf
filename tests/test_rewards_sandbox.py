"""The code sandbox contains deliberately hostile programs, with and without bubblewrap."""

import functools
import os
import resource
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sdpo_rl.rewards import sandbox as sandbox_module
from sdpo_rl.rewards.bwrap import bwrap_arguments, mount_roots
from sdpo_rl.rewards.cases import IOCase
from sdpo_rl.rewards.child_process import READ_CHUNK_BYTES
from sdpo_rl.rewards.judge import Verdict, judge
from sdpo_rl.rewards.sandbox import (
    Limits,
    Sandbox,
    resource_limits,
    scrubbed_environment,
    split_report,
    unreachable_ancestor,
)

IS_ROOT = os.geteuid() == 0
ISOLATIONS = ["bwrap", "process"]


@functools.cache
def sandbox_settings(isolation: str) -> dict | None:
    """Sandbox keyword arguments that give `isolation` on this machine, or None where it cannot work here.

    Without bubblewrap, root's programs run as nobody, who may not be able to reach the trainer's interpreter (e.g.
    under /root): the system interpreter is tried too.
    """
    if isolation == "bwrap":
        candidates = [{"use_bwrap": True}]
    else:
        candidates = [{"use_bwrap": False}, {"use_bwrap": False, "python_executable": "/usr/bin/python3"}]
    for settings in candidates:
        try:
            if Sandbox(**settings).isolation == isolation:
                return settings
        except (RuntimeError, OSError):
            continue
    return None


def make_sandbox(isolation: str, **limits) -> Sandbox:
    settings = sandbox_settings(isolation)
    if settings is None:
        pytest.skip(f"{isolation} isolation does not work on this machine")
    return Sandbox(Limits(**limits), **settings)


def run(isolation: str, code: str, **limits):
    return make_sandbox(isolation, **{"timeout_s": 5.0, **limits}).run(textwrap.dedent(code))


def processes_with(marker: str) -> list[str]:
    """The live (not zombie) processes whose command line contains `marker`."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z":
            alive.append(entry.name)
    return alive


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_is_stopped_at_the_timeout(isolation):
    started = time.monotonic()
    result = run(isolation, "while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and judge(IOCase("", ""), result).verdict is Verdict.TIME_LIMIT
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_timeout_kills_the_whole_process_group(isolation):
    marker = f"sdpo-sleeper-{uuid.uuid4().hex}"
    program = f"""
        import os, sys, time
        for _ in range(20):
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)", "{marker}"])
        print("started 20 children", flush=True)
        time.sleep(60)
    """
    result = run(isolation, program, timeout_s=2.0)
    assert result.timed_out and b"started 20 children" in result.stdout
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_4_gb_allocation_is_a_memory_limit_exceeded(isolation):
    result = run(isolation, "block = bytearray(4 * 1024**3)\nprint('allocated')\n", memory_mb=512)
    assert result.report == {"status": "memory"} and b"allocated" not in result.stdout
    assert judge(IOCase("", ""), result).verdict is Verdict.MEMORY_LIMIT


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_printing_forever_is_stopped_quickly_without_filling_memory(isolation):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = run(isolation, "while True:\n    print('x' * 10000)\n", timeout_s=10.0, max_output_bytes=200_000)
    assert result.output_exceeded and not result.timed_out
    assert time.monotonic() - started < 5.0
    assert len(result.stdout) + len(result.stderr) <= 200_000 + READ_CHUNK_BYTES
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000  # KiB
    assert judge(IOCase("", ""), result).verdict is Verdict.OUTPUT_LIMIT


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_each_run_gets_a_fresh_working_directory_that_is_removed(isolation):
    sandbox = make_sandbox(isolation)
    program = "import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('left-behind.txt', 'w').write('x')\n"
    first, second = (sandbox.run(program).stdout.decode().split(" ", 1) for _ in range(2))
    assert first[0] != second[0]
    assert first[1].strip() == second[1].strip() == "[]"
    assert not os.path.exists(first[0]) and not os.path.exists(second[0])


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_locked_directory_with_a_symlink_out_is_removed_without_touching_the_target(isolation):
    outside = tempfile.mkdtemp(prefix="sdpo-outside-")
    try:
        os.chmod(outside, 0o755)
        program = f"""
            import os
            print(os.getcwd())
            os.makedirs("locked/inner")
            os.symlink("{outside}", "locked/escape")
            os.chmod("locked", 0)
            os.chmod(".", 0)
        """
        result = run(isolation, program)
        assert result.report == {"status": "ok"}
        assert not os.path.lexists(result.stdout.decode().strip())
        assert stat.S_IMODE(os.stat(outside).st_mode) == 0o755
    finally:
        shutil.rmtree(outside)


@pytest.mark.parametrize("euid", [os.geteuid(), 12345])
def test_remove_tree_never_follows_symlinks(tmp_path, monkeypatch, euid):
    monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: euid)  # 12345: the non-root path, which chmods
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    (tree / "link").symlink_to(target)
    (tree / "locked" / "file").write_text("x")
    os.chmod(tree / "locked", 0)
    sandbox_module.remove_tree(str(tree))
    assert not tree.exists() and stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_environment_is_scrubbed(isolation, monkeypatch):
    monkeypatch.setenv("SDPO_TEST_SECRET", "hunter2-secret")
    program = """
        import os
        print(dict(os.environ))
        try:
            print(open(f"/proc/{os.getppid()}/environ", "rb").read())
        except OSError as error:
            print("parent environment unreadable:", type(error).__name__)
    """
    result = run(isolation, program)
    assert result.report == {"status": "ok"} and b"'PATH'" in result.stdout
    assert b"SDPO_TEST_SECRET" not in result.stdout
    if IS_ROOT or isolation == "bwrap":  # a same-user program without namespaces can read /proc/<trainer>/environ
        assert b"hunter2-secret" not in result.stdout


@pytest.mark.skipif(not IS_ROOT, reason="privileges are only dropped when the trainer runs as root")
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_root_runs_programs_as_nobody_who_cannot_write_root_owned_directories(isolation):
    protected = tempfile.mkdtemp(prefix="sdpo-root-owned-")
    try:
        os.chmod(protected, 0o755)
        program = f"""
            import os
            print("uid", os.getuid(), "gid", os.getgid())
            try:
                open("{protected}/owned.txt", "w").write("pwned")
                print("written")
            except OSError as error:
                print("refused:", type(error).__name__)
        """
        result = run(isolation, program)
        assert b"uid 65534 gid 65534" in result.stdout
        assert b"refused" in result.stdout and not os.path.exists(f"{protected}/owned.txt")
    finally:
        shutil.rmtree(protected)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_network_is_cut_only_with_bwrap(isolation):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("connected")
            except OSError as error:
                print("no network:", type(error).__name__)
        """
        result = run(isolation, program)
    assert (b"connected" in result.stdout) == (isolation == "process")
    assert result.report == {"status": "ok"}


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_world_readable_files_are_hidden_only_with_bwrap(isolation):
    directory = tempfile.mkdtemp(prefix="sdpo-visible-")
    try:
        os.chmod(directory, 0o755)
        Path(directory, "notes.txt").write_text("world-readable notes")
        os.chmod(Path(directory, "notes.txt"), 0o644)
        program = f"""
            try:
                print(open("{directory}/notes.txt").read())
            except OSError as error:
                print("hidden:", type(error).__name__)
        """
        result = run(isolation, program)
    finally:
        shutil.rmtree(directory)
    assert (b"world-readable notes" in result.stdout) == (isolation == "process")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_forged_report_does_not_count(isolation):
    program = """
        import os, sys
        sys.stderr.write('\\n{"status": "ok"}\\n')
        sys.stderr.flush()
        os._exit(0)
    """
    result = run(isolation, program)
    assert result.report is None and result.returncode == 0


def test_resource_limits_cap_processes_only_for_the_dropped_user():
    limits = Limits(timeout_s=2.5, memory_mb=100, max_file_bytes=1000, max_processes=7)
    assert resource_limits(limits, drops_privileges=False) == {
        "RLIMIT_AS": 100 * 1024 * 1024,
        "RLIMIT_CPU": 3,
        "RLIMIT_FSIZE": 1000,
        "RLIMIT_CORE": 0,
    }
    assert resource_limits(limits, drops_privileges=True)["RLIMIT_NPROC"] == 7


def test_scrubbed_environment_has_nothing_of_the_parent(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    environment = scrubbed_environment("/tmp/work")
    assert set(environment) == {"PATH", "HOME", "TMPDIR", "LANG"} and environment["HOME"] == "/tmp/work"


def test_split_report_takes_only_the_line_marked_with_the_nonce():
    stderr = b'debug\n{"status": "ok"}\n\nNONCE{"status": "failed"}\n'
    assert split_report(stderr, "NONCE") == ({"status": "failed"}, b'debug\n{"status": "ok"}\n')
    assert split_report(b'\n{"status": "ok"}\n', "NONCE") == (None, b'\n{"status": "ok"}\n')
    assert split_report(b"\nNONCE{broken\n", "NONCE")[0] is None


def test_mount_roots_drop_nested_and_missing_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    paths = [str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path / "a")]
    assert mount_roots(paths) == [str(tmp_path / "a")]


@pytest.mark.parametrize("as_root", [True, False])
def test_bwrap_arguments_show_only_the_given_paths(tmp_path, as_root):
    (tmp_path / "private" / "python").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    arguments = bwrap_arguments("bwrap", [str(tmp_path / "private" / "python")], str(tmp_path / "work"), as_root)
    assert ("--unshare-all" in arguments) != as_root
    assert ("CAP_SETUID" in arguments) == as_root
    assert "--unshare-net" in arguments or "--unshare-all" in arguments
    pairs = list(zip(arguments, arguments[1:], strict=False))
    assert ("--dir", str(tmp_path / "private")) in pairs  # recreated 0755, so nobody can reach the interpreter
    assert arguments[-5:] == [
        "--bind",
        str(tmp_path / "work"),
        str(tmp_path / "work"),
        "--chdir",
        str(tmp_path / "work"),
    ]
    assert str(tmp_path) not in [value for flag, value in pairs if flag in ("--bind", "--ro-bind")]


def test_unreachable_ancestor_names_the_private_directory():
    top = tempfile.mkdtemp(prefix="sdpo-reach-")
    try:
        os.chmod(top, 0o755)
        private = Path(top, "private")
        (private / "bin").mkdir(parents=True)
        os.chmod(private, 0o700)
        assert unreachable_ancestor(str(private / "bin" / "python"), 65534, 65534).startswith(f"{private} (mode 700")
        os.chmod(private, 0o755)
        assert unreachable_ancestor(str(private / "bin" / "python"), 65534, 65534) is None
    finally:
        shutil.rmtree(top)


def test_sandbox_refuses_other_operating_systems(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(RuntimeError, match="needs Linux.*'darwin'"):
        Sandbox()


def test_bad_settings_are_rejected_with_the_argument_name():
    with pytest.raises(ValueError, match="timeout_s must be a positive number, got 0"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="use_bwrap must be None"):
        Sandbox(use_bwrap="yes")
    with pytest.raises(ValueError, match=r"unprivileged_ids must be a \(uid, gid\) pair"):
        Sandbox(unprivileged_ids=(0, 0))
    with pytest.raises(ValueError, match="python_executable='/no/such/python' is not an executable file"):
        Sandbox(python_executable="/no/such/python")


def test_required_bwrap_that_is_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"use_bwrap=True, but bubblewrap \(`bwrap`\) is not installed"):
        assert Sandbox(use_bwrap=True).isolation


@pytest.mark.skipif(
    not IS_ROOT or unreachable_ancestor(sys.executable, 65534, 65534) is None,
    reason="needs root and an interpreter that nobody cannot reach",
)
def test_root_without_bwrap_explains_an_interpreter_nobody_cannot_reach():
    with pytest.raises(RuntimeError, match=r"cannot run as uid 65534.*is not searchable.*install bubblewrap"):
        assert Sandbox(use_bwrap=False).isolation
