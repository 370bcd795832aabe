"""Every Triton kernel variant compiles to a CUDA binary for sm_80 and sm_90, on this machine.

The variants are the example launches each op module declares beside its kernels
(`compile_variants()`), recorded instead of run; see compile_kernels.py. The interpreter (used by the
other tests on CPU) checks the kernels' arithmetic, not what only the compiler enforces, so the compiler
runs in a subprocess without TRITON_INTERPRET (conftest.py sets it for this process).
"""
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("triton")
import compile_kernels  # noqa: E402

LAUNCHES = compile_kernels.collect()  # recorded only: nothing compiles or runs here
NAMES = [f"{launch.name}-sm{arch}" for launch in LAUNCHES for arch in compile_kernels.ARCHS]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_kernel_compiles(compiled, name):
    assert compiled.get(name) == "ok", compiled.get(name, "not compiled")


def test_every_kernel_is_launched_by_a_variant():
    launched = {id(launch.kernel) for launch in LAUNCHES}
    kernels = {f"{module.__name__}.{name}": kernel for module in compile_kernels.op_modules()
               for name, kernel in compile_kernels.module_kernels(module).items()}
    assert kernels, "found no kernels"
    missing = sorted(name for name, kernel in kernels.items() if id(kernel) not in launched)
    assert not missing, f"kernels that no compile_variants() launches: {missing}"


def test_float_arguments_compile_as_fp32():
    """A float argument is typed fp32, and no parameter that takes a float in one launch takes an
    int in another (it would compile, as an integer, in that one)."""
    types = defaultdict(set)  # (kernel, parameter) -> the Python types passed to it
    for launch in LAUNCHES:
        signature, _ = launch.signature()
        for name, value in launch.args.items():
            if signature[name] != "constexpr":
                types[launch.kernel.__name__, name].add(type(value))
            if isinstance(value, float):
                assert signature[name] == "fp32", (launch.name, name, signature[name])
    mixed = sorted(key for key, seen in types.items() if float in seen and seen - {float})
    assert not mixed, f"parameters given both floats and other values: {mixed}"
