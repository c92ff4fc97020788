"""Shared fixtures: a private cache folder and a small prepared corpus (a slice of the standard library)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the tests away from the user's ~/.cache/gptforge, and make every host count as a CPU without
    native bf16, so `precision=auto` means fp32 whatever the CPU: the suite's figures do not depend on the
    machine. Tests of the other kind force it with the `native_bf16_cpu` fixture."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GPTFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("GPTFORGE_CPU_NATIVE_BF16", "0")
    yield
    mp.undo()


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    """This test runs as on a CPU with native bf16 (AVX512-BF16 or AMX), whatever the host has."""
    monkeypatch.setenv("GPTFORGE_CPU_NATIVE_BF16", "1")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """~0.5 MB of real Python (the json and email packages) prepared with a 512-token BPE."""
    from gptforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("small")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        shutil.copytree(stdlib / package, root / "src" / package, ignore=shutil.ignore_patterns("__pycache__"))
    prepare([str(root / "src")], root / "data", vocab_size=512, progress=False)
    return root / "data"
