"""pytest-benchmark entries for the op benchmarks (`pytest bench/ --benchmark-only`).

Small shapes so that a run takes seconds; bench/ops.py is the full benchmark with roofline units. The
providers are the op benchmarks' own (bench/op_<op>.py).
"""
import pytest
import torch

import op_gae
import op_token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V = 512, 32000


@pytest.fixture(scope="module")
def logits_labels():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, V, generator=g).to(DEVICE),
            torch.randint(0, V, (N,), generator=g).to(DEVICE))


@pytest.mark.parametrize("entropy", [False, True], ids=["logprobs", "logprobs+entropy"])
@pytest.mark.parametrize("provider", ["fastppo-triton", "fastppo-native", "fastppo-torch", "eager",
                                      "compile", "trl"])
def test_token_logprobs_fwd_bwd(benchmark, logits_labels, provider, entropy):
    providers = op_token_logprobs.providers("token_logprobs+entropy" if entropy else "token_logprobs",
                                            DEVICE)
    if provider not in providers:
        pytest.skip(f"{provider} does not run here")
    run = providers[provider]
    logits, labels = logits_labels

    def fwd_bwd():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(op_token_logprobs.objective(run(x, labels)), x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    fwd_bwd()  # warm-up (compilation, the native build)
    benchmark(fwd_bwd)


@pytest.mark.parametrize("provider", ["fastppo-triton", "fastppo-native", "fastppo-torch", "eager"])
def test_gae_fwd(benchmark, provider):
    providers = op_gae.providers("gae", DEVICE)
    if provider not in providers:
        pytest.skip(f"{provider} does not run here")
    rewards, values = torch.randn(64, 256, device=DEVICE), torch.randn(64, 256, device=DEVICE)
    mask = torch.ones(64, 256, dtype=torch.bool, device=DEVICE)
    benchmark(providers[provider], rewards, values, mask)
