"""KT_ISA selects the kernel path at import; an unknown or unsupported request fails the import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kt_kernel
from kt_kernel import _native

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")


def run_import(isa: str, code: str = "import kt_kernel; print(kt_kernel.__cpu_variant__)"):
    env = dict(os.environ, KT_ISA=isa)  # PYTHONPATH from Bazel's runfiles is inherited.
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_variant_is_what_kt_isa_asks_for():
    requested = os.environ.get("KT_ISA", "").strip()
    expected = requested if requested else _native._kt.best_isa()
    assert kt_kernel.__cpu_variant__ == _native._kt.resolve_isa(requested) == expected
    assert kt_kernel.cpu_features()


def test_scalar_is_always_available_and_computes():
    code = (
        "import torch, kt_kernel\n"
        "m = kt_kernel.KTMoEWrapper(0, 2, 1, 64, 64, None, 1, 1, None, 4, method='BF16')\n"
        "w = torch.ones(2, 64, 64, dtype=torch.bfloat16) / 64\n"
        "m.load_weights_from_tensors(w, w.clone(), w.clone(), None)\n"
        "out = m.forward(torch.ones(1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.int64),\n"
        "                torch.ones(1, 1), None)\n"
        "assert torch.isfinite(out.float()).all() and out.abs().max() > 0\n"
        "print(kt_kernel.__cpu_variant__, m.isa)\n"
    )
    result = run_import("scalar", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["scalar", "scalar"]


def test_supported_paths_are_honoured_exactly():
    for isa in ALL_ISAS:
        if not _native._kt.isa_supported(isa) or isa == "amx":
            continue
        result = run_import(isa)
        if result.returncode != 0 and "not implemented" in result.stderr:
            continue  # A path the CPU has but kt has no kernels for yet fails, as it should.
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == isa


def test_unknown_isa_fails_the_import():
    result = run_import("avx9000")
    assert result.returncode != 0
    assert "ImportError: kt_kernel: KT_ISA=" in result.stderr and "avx9000" in result.stderr, result.stderr


def test_unsupported_isa_fails_the_import_without_downgrade():
    missing = [isa for isa in ALL_ISAS if not _native._kt.isa_supported(isa)]
    if not missing:
        pytest.skip("this CPU supports every kernel path")  # Nothing to request that it lacks.
    result = run_import(missing[0])
    assert result.returncode != 0
    assert f"ImportError: kt_kernel: KT_ISA={missing[0]}" in result.stderr, result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
