"""The glibc allocator settings the demo applies on CPU."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_rl import cpu_memory

MODULE = Path(cpu_memory.__file__)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings exist in glibc only")
def test_settings_are_applied_with_glibc():
    # In a fresh interpreter (the module file alone), so that the test run's own allocator keeps its settings.
    code = (
        f"import importlib.util as u; spec = u.spec_from_file_location('m', {str(MODULE)!r}); "
        "m = u.module_from_spec(spec); spec.loader.exec_module(m); assert m.return_freed_memory() is True; m.trim()"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


def test_settings_are_skipped_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.return_freed_memory() is False
    cpu_memory.trim()
