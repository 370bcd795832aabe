"""Every Triton kernel variant compiles to a CUDA binary for sm_80 and sm_90, on this machine.

The interpreter (used by the other tests on CPU) checks the kernels' arithmetic, not what only the
compiler enforces; see compile_kernels.py. This runs the compiler in a subprocess without
TRITON_INTERPRET (conftest.py sets it for this process).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import compile_kernels  # noqa: E402

NAMES = [f"{name}-sm{arch}" for name, *_ in compile_kernels.variants() for arch in (80, 90)]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_kernel_compiles(compiled, name):
    assert compiled.get(name) == "ok", compiled.get(name, "not compiled")
