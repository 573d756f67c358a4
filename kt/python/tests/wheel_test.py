"""The wheel built by //kt/python:wheel installs with pip and works from the install location."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import pytest

WHEEL_GLOB = "kt/python/kt_kernel-*-cp311-cp311-linux_x86_64.whl"


def find_wheel() -> str:
    roots = [os.environ.get("TEST_SRCDIR", ""), os.getcwd()]
    for root in roots:
        for base in (os.path.join(root, os.environ.get("TEST_WORKSPACE", "kt")), root):
            found = glob.glob(os.path.join(base, WHEEL_GLOB))
            if found:
                return found[0]
    pytest.fail(f"no wheel matching {WHEEL_GLOB} in the runfiles (data dependency //kt/python:wheel)")


def test_wheel_contents():
    whl = find_wheel()
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "kt_kernel/__init__.py" in names and "kt_kernel/_kt.so" in names
        dist_info = [n for n in names if n.endswith(".dist-info/RECORD")]
        assert len(dist_info) == 1, names
        record = z.read(dist_info[0]).decode()
        wheel_meta = z.read(dist_info[0].replace("RECORD", "WHEEL")).decode()
    assert "Tag: cp311-cp311-linux_x86_64" in wheel_meta
    assert "Root-Is-Purelib: false" in wheel_meta
    recorded = {line.split(",")[0] for line in record.splitlines() if line}
    assert recorded == set(names)


def test_pip_install_and_run():
    whl = find_wheel()
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "site")
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", HOME=tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target", target, whl],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        code = (
            "import torch, kt_kernel\n"
            f"assert kt_kernel.__file__.startswith({target!r}), kt_kernel.__file__\n"
            "m = kt_kernel.KTMoEWrapper(0, 4, 2, 64, 64, None, 2, 1, None, 8, method='BF16')\n"
            "g = torch.randn(4, 64, 64).to(torch.bfloat16)\n"
            "m.load_weights_from_tensors(g, g.clone(), g.clone(), None)\n"
            "x = torch.randn(3, 64).to(torch.bfloat16)\n"
            "out = m.forward(x, torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.full((3, 2), 0.5), None)\n"
            "assert out.shape == (3, 64) and out.dtype == torch.bfloat16 and out.abs().max() > 0\n"
            "print(kt_kernel.__version__, kt_kernel.__cpu_variant__)\n"
        )
        # Only the install location on the path: not Bazel's runfiles copy of kt_kernel.
        run_env = dict(env, PYTHONPATH=target)
        result = subprocess.run(
            [sys.executable, "-c", code], env=run_env, cwd=tmp, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
