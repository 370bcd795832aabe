"""The `fastppo` command.

Today it has one subcommand, `demo`, a short example of the fused log-prob kernel on a small causal
LM built from a config (nothing is downloaded). The PPO engine's commands come with the engine.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def demo(args: argparse.Namespace) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastppo import reference
    from fastppo.kernels import token_logprobs

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    logits = model(tokens).logits  # (B, T, V)
    print(f"fastppo demo: token log-probs of a random {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-"
          f"parameter Llama on {args.batch}x{args.seq_len} tokens, V={args.vocab}, "
          f"temperature={args.temperature}, device={device}")

    # logits[:, :-1] predicts tokens[:, 1:]: the kernel reads the strided view without a copy.
    x64 = logits.detach().double().requires_grad_()
    lp64, ent64 = reference.token_logprobs(x64[:, :-1], tokens[:, 1:], temperature=args.temperature,
                                           return_entropy=True)
    (lp64.sum() + ent64.sum()).backward()
    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    print(f"{'backend':8} {'mean logprob':>13} {'mean entropy':>13} {'max |dlp|':>10} "
          f"{'max |dgrad|':>11} {'fwd+bwd ms':>11}")
    for backend in backends:
        x = logits.detach().requires_grad_()
        start = time.perf_counter()
        lp, ent = token_logprobs(x[:, :-1], tokens[:, 1:], temperature=args.temperature,
                                 return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        print(f"{backend:8} {lp.mean().item():13.4f} {ent.mean().item():13.4f} "
              f"{(lp.double() - lp64).abs().max().item():10.2e} "
              f"{(x.grad.double() - x64.grad).abs().max().item():11.2e} {ms:11.1f}")
    print("differences are against the float64 reference (fastppo.reference). "
          "The PPO engine (`fastppo demo` running SFT -> RM -> PPO) is not built yet.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastppo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the fused log-prob kernel on a small random causal LM")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--batch", type=int, default=4, help="sequences (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("vocab", "batch", "seq_len"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}; "
                         f"got {getattr(args, name)}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0; got {args.temperature}")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
