"""A fused forward with the reference's own gradient: for the small rollout ops (O(B*T) elementwise
work and reductions), backward re-evaluates the plain-PyTorch reference under autograd. The gradient is
then the reference's by construction; only the forward needs a kernel."""
from __future__ import annotations

from typing import Callable

import torch


class _ReferenceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast, ref, *inputs):
        ctx.ref = ref
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        out = fast(*inputs)
        ctx.single = isinstance(out, torch.Tensor)
        return out

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
            outs = ctx.ref(*leaves)
            outs = (outs,) if ctx.single else outs
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wrt = [leaf for leaf, n in zip(leaves, needs) if n]
            found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                        allow_unused=True) if pairs else [None] * len(wrt)
        found = iter(found)
        result = []
        for leaf, n in zip(leaves, needs):
            g = next(found) if n else None
            result.append(torch.zeros_like(leaf) if n and g is None else g)
        return (None, None, *result)


def with_reference_backward(fast: Callable, ref: Callable, *inputs: torch.Tensor):
    """fast(*inputs) in forward; the gradient of ref(*inputs) in backward. Both return the same
    outputs (a tensor or a tuple of tensors)."""
    if not any(t.requires_grad for t in inputs) or not torch.is_grad_enabled():
        return fast(*inputs)
    return _ReferenceBackward.apply(fast, ref, *inputs)
