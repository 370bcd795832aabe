"""Compile every Triton kernel variant to a CUDA binary (sm_80 and sm_90) without a GPU.

Triton's interpreter runs the kernels' arithmetic on CPU but not its compiler: rules such as "a jitted
function may read only constexpr globals", loop-carried type consistency or pointer-type checks are
enforced only when compiling. Triton's wheel ships the NVIDIA toolchain (ptxas), so the whole pipeline
down to a cubin runs on any Linux machine.

The variants live beside the kernels: every public op module of fastppo.kernels has a
`compile_variants()` yielding (name, launch), where launch() calls the module's own launchers on meta
tensors. Here Triton's launch entry point (JITFunction.run, or InterpretedFunction.run under
TRITON_INTERPRET) is patched to record each launch instead of running it, and the kernel's signature
is built from the recorded values with Triton's own mapping, `triton.runtime.jit.mangle_type` (a tensor
is a pointer to its dtype, an int i32 or i64 by its value, a float fp32, a bool u1), and its constexprs
from the kernel's parameters. What compiles is therefore what real launches pass, typed as the runtime
types it (without the runtime's value specialisations: 16-byte alignment, an int equal to 1).

Run as a script (TRITON_INTERPRET must be unset); prints a JSON object {variant: "ok" | error}.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
from collections import Counter
from dataclasses import dataclass
from unittest import mock

ARCHS = (80, 90)


@dataclass
class Launch:
    """One recorded kernel launch."""

    name: str      # "<module>/<variant>/<kernel>", "#2" after a kernel's second launch in a variant
    kernel: object  # the JITFunction (an InterpretedFunction under TRITON_INTERPRET)
    args: dict     # every parameter's value, by name (defaults applied)
    options: dict  # the other launch keywords: num_warps, num_stages, ...

    def signature(self) -> tuple[dict, dict]:
        """(Triton signature {parameter: type}, constexprs {parameter: value}) from the values."""
        from triton.runtime.jit import mangle_type

        signature, constexprs = {}, {}
        for param in kernel_params(self.kernel):
            value = self.args[param.name]
            # None is a constexpr to the runtime too (mangle_type(None) == "constexpr").
            signature[param.name] = "constexpr" if param.is_constexpr else mangle_type(value)
            if signature[param.name] == "constexpr":
                constexprs[param.name] = value
        return signature, constexprs


def kernel_params(kernel):
    """The kernel's parameters (Triton's KernelParam, with is_constexpr). An InterpretedFunction has
    none: they are built from the function's signature as JITFunction builds its own."""
    from triton.runtime.jit import KernelParam

    if hasattr(kernel, "params"):
        return kernel.params
    return [KernelParam(i, p, False, False)
            for i, p in enumerate(inspect.signature(kernel.fn).parameters.values())]


def op_modules() -> list:
    """The public op modules of fastppo.kernels: not the private _*.py, not the reference."""
    import fastppo.kernels as package

    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)
            if not info.name.startswith("_") and info.name != "reference"]


def module_kernels(module) -> dict:
    """A module's kernels: its @triton.jit functions whose name ends in `_kernel`."""
    from triton.runtime.jit import KernelInterface

    return {name: obj for name, obj in vars(module).items()
            if name.endswith("_kernel") and isinstance(obj, KernelInterface)}


@contextlib.contextmanager
def recording(launches: list):
    """Within: `kernel[grid](...)` appends (kernel, args by name, options) and runs nothing."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(kernel, *args, grid, warmup, **kwargs):
        sig = inspect.signature(kernel.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        bound.apply_defaults()
        options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
        launches.append((kernel, dict(bound.arguments), options))

    with mock.patch.object(JITFunction, "run", run), mock.patch.object(InterpretedFunction, "run", run):
        yield


def collect() -> list[Launch]:
    """Every launch of every variant of every op module, recorded (nothing compiles or runs)."""
    launches = []
    for module in op_modules():
        short = module.__name__.rsplit(".", 1)[-1]
        for variant, launch in getattr(module, "compile_variants", lambda: ())():
            recorded = []
            with recording(recorded):
                launch()
            if not recorded:
                raise RuntimeError(f"{short}/{variant} launched no kernel")
            seen = Counter()
            for kernel, args, options in recorded:
                seen[kernel.__name__] += 1
                count = seen[kernel.__name__]
                name = f"{short}/{variant}/{kernel.__name__}" + (f"#{count}" if count > 1 else "")
                launches.append(Launch(name, kernel, args, options))
    repeated = [name for name, n in Counter(launch.name for launch in launches).items() if n > 1]
    if repeated:
        raise RuntimeError(f"variant names used twice: {repeated}")
    return launches


def compile_launch(launch: Launch, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = launch.signature()
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    results = {}
    for launch in collect():
        for arch in ARCHS:
            try:
                compiled = compile_launch(launch, arch)
                results[f"{launch.name}-sm{arch}"] = "ok" if compiled.asm.get("cubin") else "no cubin"
            except Exception as e:  # reported per variant, with the compiler's message
                results[f"{launch.name}-sm{arch}"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
