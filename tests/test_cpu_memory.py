"""Handing freed heap memory back to the system (the demo does it before its final evaluation)."""

import platform

import pytest

from sdpo_rl.apps import cpu_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim exists in glibc only")
def test_trim_runs_with_glibc():
    assert cpu_memory.trim() is True


def test_trim_is_skipped_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.trim() is False
