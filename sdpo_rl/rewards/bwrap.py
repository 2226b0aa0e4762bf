"""The bubblewrap (`bwrap`) command line that gives a program its own namespaces and a minimal, read-only view of
the filesystem: system libraries, the interpreter, and its working directory (the only writable place)."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")


def mount_roots(paths: list[str]) -> list[str]:
    """The existing paths among `paths`, without those inside another one, sorted."""
    roots: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths if os.path.exists(p)}):
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
            roots.append(path)
    return roots


def bwrap_arguments(bwrap: str, read_only: list[str], workdir: str, as_root: bool) -> list[str]:
    """The bubblewrap command line (without the program) that shows the program only `read_only` and `workdir`.

    System directories that are symlinks (merged /usr) are recreated as symlinks. The directories above each mount
    point are created with mode 0755, so an unprivileged user can reach the interpreter even where the host's
    directory (e.g. /root) is private. As root, bubblewrap runs without a user namespace and keeps only
    CAP_SETUID/CAP_SETGID, which the runner uses to switch to the unprivileged user before the program starts.
    """
    symlinks = [path for path in read_only if os.path.islink(path)]
    binds = mount_roots([path for path in read_only if path not in symlinks])
    mount_points = [*binds, workdir]
    parents = sorted(
        {str(parent) for point in mount_points for parent in Path(point).parents if str(parent) != "/"}
        - set(mount_points)
    )
    if as_root:
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        namespaces = ["--unshare-all"]
    arguments = [bwrap, "--die-with-parent", *namespaces, "--dev", "/dev", "--proc", "/proc"]
    for link in symlinks:
        arguments += ["--symlink", os.readlink(link), link]
    for parent in parents:
        arguments += ["--dir", parent]
    for path in binds:
        arguments += ["--ro-bind", path, path]
    return [*arguments, "--bind", workdir, workdir, "--chdir", workdir]
