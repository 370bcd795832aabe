"""The peers' own log-prob + entropy helpers from logits, as shipped and patched by
fastppo.integrations, side by side (CPU or CUDA).

    python bench/peer_helpers.py [--rows 1024] [--vocab 32000 151936] [--repeat 5]

For each peer installed: its log-probs and entropies of N rows of V float32 logits at T = 0.7, as the
peer's trainer computes them, forward + backward of sum(log-probs) + 0.1 sum(entropy):
- trl:      selective_log_softmax_and_entropy(logits, index, temperature=0.7)
- verl:     logprobs_from_logits(logits / 0.7, labels) and entropy_from_logits(logits / 0.7)
- openrlhf: log_probs_from_logits(logits / 0.7, labels) and compute_entropy(logits / 0.7)
            (imported as tests/integrations/test_openrlhf.py does: flash-attn and DeepSpeed
            stand-ins, its torch.compile skipped; so the original runs eagerly)
Median of --repeat after 2 warm-ups, and the peak memory above the start (CPU: RSS), each side in
the same process, the peer's original first. Appends to bench/results/peer_helpers.csv.
Byte floor: forward reads N*V*4 bytes, backward reads them again and writes N*V*4.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util

import torch

from common import (allocator_env, append_csv, device_name, git_revision, peak_mib, time_ms,
                    today)

T = 0.7


def step_fn(peer: str):
    """f(logits, labels) -> the loss of the peer's helpers, looked up at call time (patched or not)."""
    if peer == "trl":
        import trl.trainer.utils as u

        def f(x, y):
            lp, ent = u.selective_log_softmax_and_entropy(x, y, temperature=T)
            return lp.float().sum() + 0.1 * ent.float().sum()
    elif peer == "verl":
        import verl.utils.torch_functional as u

        def f(x, y):
            z = x / T
            return u.logprobs_from_logits(z, y).float().sum() + 0.1 * u.entropy_from_logits(z).float().sum()
    else:
        from fastppo.integrations.openrlhf import import_without_gpu_only_modules
        import_without_gpu_only_modules()
        import openrlhf.models.utils as u

        def f(x, y):
            z = x / T
            return u.log_probs_from_logits(z, y).float().sum() + 0.1 * u.compute_entropy(z).float().sum()
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--peers", nargs="+", default=["trl", "verl", "openrlhf"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    for peer in args.peers:
        if importlib.util.find_spec(peer) is None:
            print(f"{peer}: not installed, skipped")
            continue
        integration = importlib.import_module(f"fastppo.integrations.{peer}")
        f = step_fn(peer)
        for vocab in args.vocab:
            g = torch.Generator().manual_seed(0)
            logits = (2 * torch.randn(args.rows, vocab, generator=g)).to(args.device)
            labels = torch.randint(0, vocab, (args.rows,), generator=g).to(args.device)
            leaf = lambda: logits.clone().requires_grad_()  # noqa: E731
            run = lambda x: f(x, labels).backward()  # noqa: E731
            got = {}
            for side in ("peer", "fastppo"):
                if side == "fastppo":
                    integration.patch()
                try:
                    ms, _, _ = time_ms(run, args.device, repeat=args.repeat, setup=leaf)
                    # the logits' gradient (N*V*4 bytes) is kept by the caller on both sides
                    peak = peak_mib(run, args.device, setup=leaf, exclude_bytes=logits.numel() * 4)
                finally:
                    integration.unpatch()
                got[side] = (ms, peak)
                rows.append({"date": today(), "revision": git_revision(),
                             "device": device_name(args.device), "allocator": allocator_env(),
                             "torch": torch.__version__, "peer": peer,
                             "peer_version": importlib.metadata.version(peer), "rows": args.rows,
                             "vocab": vocab, "side": side, "ms": round(ms, 2),
                             "peak_mib": round(peak, 1),
                             "gbps": round(3 * logits.numel() * 4 / (ms / 1e3) / 1e9, 2)})
            (pm, pp), (fm, fp) = got["peer"], got["fastppo"]
            print(f"{peer:8s} V={vocab:6d}  {peer} {pm:8.1f} ms {pp:7.1f} MiB   fastppo {fm:8.1f} ms "
                  f"{fp:7.1f} MiB   speed x{pm / fm:.2f}", flush=True)
    if rows:
        print("appended to", append_csv("peer_helpers.csv", rows))


if __name__ == "__main__":
    main()
