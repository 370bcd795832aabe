"""Run by test_whiten.py under torchrun (2 gloo ranks): each rank whitens its own, differently shaped
part of one global tensor with process_group=WORLD, and writes its output and gradient to
OUT/rank<r>.safetensors for the test to compare with the single-process op on the whole tensor.
Without a GPU the test passes TRITON_INTERPRET=1 in the environment (set by conftest.py), so the
"triton" backend runs interpreted here too."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fastppo.kernels import masked_whiten

PARTS = [(1, 37), (2, 37)]  # rank r's rows of the global (3, 37) tensor


def global_inputs(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 37, generator=g) * 2 + 0.5).to(dtype)
    mask = torch.rand(3, 37, generator=g) < 0.7
    upstream = torch.randn(3, 37, generator=g)
    return x, mask, upstream


def main(out):
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = dist.get_rank()
    start = sum(rows for rows, _ in PARTS[:rank])
    mine = slice(start, start + PARTS[rank][0])
    results = {}
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            for shift_mean in (True, False):
                x, mask, upstream = global_inputs(dtype)
                part = x[mine].clone().requires_grad_()
                y = masked_whiten(part, mask[mine], shift_mean=shift_mean, backend=backend,
                                  process_group=dist.group.WORLD)
                (y * upstream[mine]).sum().backward()
                key = f"{backend}-{str(dtype).removeprefix('torch.')}-{shift_mean}"
                results[f"{key}/out"], results[f"{key}/grad"] = y.detach(), part.grad.float()
    try:  # fewer than 2 valid entries over all ranks: the same error on every rank
        masked_whiten(torch.zeros(2), torch.tensor([rank == 0, False]), process_group=dist.group.WORLD)
    except ValueError as e:
        results["error"] = torch.tensor([1.0 if "over all ranks" in str(e) else 0.0])
    save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/rank{rank}.safetensors")
    dist.barrier()  # no rank tears gloo down while the other still talks to it (seen: SIGABRT)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
