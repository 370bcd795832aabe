"""Compile every Triton kernel variant to a CUDA binary (sm_80 and sm_90) without a GPU.

Triton's interpreter runs the kernels' arithmetic on CPU but not its compiler: rules such as "a jitted
function may read only constexpr globals", loop-carried type consistency or pointer-type checks are
enforced only when compiling. Triton's wheel ships the NVIDIA toolchain (ptxas), so the whole pipeline
down to a cubin runs on any Linux machine. Run as a script (TRITON_INTERPRET must be unset); prints a
JSON object {variant: "ok" | error}.
"""
import importlib
import itertools
import json
import os
import sys

FLOAT_ARGS = {"temperature", "kl_coef", "gamma", "decay", "clip_low", "clip_high", "dual_clip",
              "value_clip", "vf_coef", "entropy_coef"}


def variants():
    """(name, module, kernel, pointer types, constexprs, 64-bit strides)."""
    tlp, ppo = "fastppo.kernels.token_logprobs", "fastppo.kernels.ppo_loss"
    for dt, ent, wide in itertools.product(["bf16", "fp16", "fp32"], [False, True], [False, True]):
        ptrs = {"logits_ptr": f"*{dt}", "labels_ptr": "*i32" if wide else "*i64"}
        yield (f"token_logprobs_fwd-{dt}-entropy={ent}-i64strides={wide}", tlp,
               "_token_logprobs_fwd_kernel", ptrs, dict(RETURN_ENTROPY=ent, BLOCK_V=4096), wide)
        yield (f"token_logprobs_bwd-{dt}-entropy={ent}-i64strides={wide}", tlp,
               "_token_logprobs_bwd_kernel", dict(ptrs, grad_logits_ptr=f"*{dt}"),
               dict(HAS_GRAD_ENTROPY=ent, BLOCK_V=4096), wide)
    for est in (1, 2, 3):
        yield (f"kl_penalty-k{est}", "fastppo.kernels.kl", "_kl_penalty_kernel",
               {"lp_ptr": "*bf16"}, dict(ESTIMATOR=est, BLOCK=1024), False)
        yield (f"kl_rewards-k{est}", "fastppo.kernels.kl", "_kl_rewards_kernel",
               {"mask_ptr": "*u8"}, dict(ESTIMATOR=est, BLOCK_T=1024), False)
    for has_values in (False, True):
        yield (f"gae-values={has_values}", "fastppo.kernels.gae", "_gae_kernel",
               {"mask_ptr": "*u8", "values_ptr": "*bf16"}, dict(HAS_VALUES=has_values, BLOCK_T=1024),
               False)
    yield ("whiten_stats", "fastppo.kernels.whiten", "_whiten_stats_kernel", {"mask_ptr": "*u8"},
           dict(BLOCK=1024), False)
    for shift in (False, True):
        yield (f"whiten_apply-shift={shift}", "fastppo.kernels.whiten", "_whiten_apply_kernel",
               {"mask_ptr": "*u8"}, dict(SHIFT_MEAN=shift, BLOCK=1024), False)
    flags = ["HAS_CLIP", "HAS_DUAL_CLIP", "HAS_VALUES", "HAS_VALUE_CLIP"]
    for dt, on, kl in [("bf16", True, 3), ("bf16", False, 0), ("fp32", True, 1), ("fp16", True, 2)]:
        ptrs = {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "mask_ptr": "*u8",
                "values_ptr": "*bf16", "old_values_ptr": "*bf16"}
        yield (f"ppo_fwd-{dt}-flags={on}-kl=k{kl}", ppo, "_ppo_loss_fwd_kernel", ptrs,
               dict({f: on for f in flags}, KL_ESTIMATOR=kl, BLOCK_V=4096), True)
        yield (f"ppo_bwd-{dt}-flags={on}", ppo, "_ppo_loss_bwd_kernel",
               dict(ptrs, grad_logits_ptr=f"*{dt}", grad_values_ptr="*bf16"),
               dict(HAS_ENTROPY=on, HAS_VALUES=on, BLOCK_V=4096), True)


def signature(kernel, ptrs, constexprs, wide):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if wide and "stride" in name else "i32"
    return sig


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, module, kernel, ptrs, constexprs, wide in variants():
        fn = getattr(importlib.import_module(module), kernel)
        for arch in (80, 90):
            try:
                src = ASTSource(fn=fn, signature=signature(fn, ptrs, constexprs, wide),
                                constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                results[f"{name}-sm{arch}"] = "ok" if compiled.asm.get("cubin") else "no cubin"
            except Exception as e:  # reported per variant, with the compiler's message
                results[f"{name}-sm{arch}"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
