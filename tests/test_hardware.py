"""What the machine can do: native bf16 detection (every `auto` precision asks it) and the memory available for
optional copies (`train.dense_base` auto), and the range of weights this CPU's int8 GEMM multiplies exactly
(`train.int8_base`)."""

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


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An int8 GEMM as oneDNN computes it without VNNI: the signed input shifted to u8 (+128), pairs of u8 x s8
    products summed in 16 bits with saturation, the shift's contribution subtracted after."""
    u, w = a.long() + 128, b.long()
    prods = u[:, :, None] * w[None]  # (M, K, N)
    pairs = prods.view(u.shape[0], -1, 2, w.shape[1]).sum(2).clamp(-32768, 32767)
    return (pairs.sum(1) - 128 * w.sum(0)[None]).to(torch.int32)


@pytest.mark.parametrize("int_mm,expected", [(None, "measured"), (_saturating_int_mm, 63),
                                             (lambda a, b: torch._int_mm(a, b) + 1, None)])
def test_int8_matmul_limit_is_what_the_gemm_computes_exactly(monkeypatch, int_mm, expected):
    """The probe finds the weight range the int8 GEMM gets exactly right: this machine's own answer (checked here
    against exact integer products at that range), 63 for a GEMM that saturates 16-bit pair sums (AVX2 without
    VNNI), None for one that is wrong even then."""
    if int_mm is not None:
        monkeypatch.setattr(torch, "_int_mm", int_mm)
    hardware.int8_matmul_limit.cache_clear()
    hardware.int8_matmul_speedup.cache_clear()
    try:
        limit = hardware.int8_matmul_limit()
        if expected != "measured":
            assert limit == expected
            assert (hardware.int8_matmul_speedup() == 0.0) is (expected is None)
            return
        assert limit in (127, 63, None)
        if limit is not None:  # the range it promises is exact on other shapes too
            g = torch.Generator().manual_seed(5)
            a = torch.randint(-127, 128, (37, 300), generator=g, dtype=torch.int8)
            w = torch.randint(-limit, limit + 1, (120, 300), generator=g, dtype=torch.int8)
            assert torch.equal(torch._int_mm(a, w.t()).long(), a.long() @ w.long().t())
            assert hardware.int8_matmul_speedup() > 0
    finally:
        hardware.int8_matmul_limit.cache_clear()
        hardware.int8_matmul_speedup.cache_clear()


def test_the_saturating_reference_gemm_is_exact_within_its_range():
    """The model of a non-VNNI GEMM above is itself right where no pair saturates (and wrong where one does)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    small = torch.randint(-63, 64, (64, 16), generator=g, dtype=torch.int8)
    assert torch.equal(_saturating_int_mm(a, small).long(), a.long() @ small.long())
    big = torch.full((64, 16), 127, dtype=torch.int8)
    assert not torch.equal(_saturating_int_mm(torch.full((8, 64), 127, dtype=torch.int8), big).long(),
                           torch.full((8, 64), 127).long() @ big.long())
