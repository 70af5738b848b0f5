"""What the machine can do: native bf16 detection (every `auto` precision asks it) and the memory available for
optional copies (`train.dense_base` auto)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmlab.hardware as hardware


@pytest.mark.parametrize("flags,capability,expected", [({"avx512f", "avx512_bf16"}, "AVX512", True),
                                                        ({"avx2", "amx_bf16"}, "AVX512", True),
                                                        ({"avx512f", "avx512_bf16"}, "AVX2", False),
                                                        ({"avx2", "fma"}, "AVX2", False)])
def test_native_bf16_detection(monkeypatch, flags, capability, expected):
    from llmlab.checkpoint import dtype_from_name

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    hardware.native_bf16.cache_clear()
    try:
        assert hardware.native_bf16("cpu") is expected
        cpu = torch.device("cpu")
        assert dtype_from_name("auto", cpu, bf16_if_native=True) == (torch.bfloat16 if expected else torch.float32)
        assert dtype_from_name("auto", cpu) == torch.float32  # the default is unchanged
    finally:
        hardware.native_bf16.cache_clear()


def test_available_memory_is_the_systems_available_memory_on_linux():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
              if line.split()[1:2] and line.split()[1].isdigit()}
    got = hardware.available_memory("cpu")
    assert got is not None and 0 < got <= fields["MemTotal"]
    assert abs(got - fields["MemAvailable"]) < 2**30  # read a moment apart: within a GiB


def test_available_memory_falls_back_and_admits_not_knowing(monkeypatch):
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no procfs"))
                        if str(self) == "/proc/meminfo" else real(self, *a, **k))
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(hardware.os, "sysconf", lambda name: pages[name])
    assert hardware.available_memory("cpu") == 4096 * 1000
    monkeypatch.setattr(hardware.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert hardware.available_memory("cpu") is None
    assert hardware.available_memory("meta") is None


def test_cpp_compiler_is_the_first_on_the_path(monkeypatch):
    found = {"c++": "/usr/bin/c++", "clang++": "/usr/bin/clang++"}
    monkeypatch.setattr(hardware.shutil, "which", lambda name: found.get(name))
    assert hardware.cpp_compiler() == "c++"
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert hardware.cpp_compiler() is None


@pytest.mark.parametrize("capability,verified", [("AVX512", True), ("AMX", True), ("AVX2", False),
                                                 ("DEFAULT", False), ("unknown", False)])
def test_compiled_steps_are_verified_on_avx512_and_amx_only(monkeypatch, capability, verified):
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    assert hardware.compile_verified_cpu() is verified
