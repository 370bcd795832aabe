"""fastppo.kernels: fused Triton kernels for PPO, computed directly from logits. Public, stable API.

Every op takes `backend=`: "triton" (the fused kernels), "torch" (the plain-PyTorch reference in
`fastppo.reference`, evaluated in chunks) or "auto" (Triton on CUDA tensors, the reference on CPU).
FASTPPO_BACKEND in the environment replaces "auto".
"""
if __name__ != "fastppo.kernels":
    # This directory is installed as fastppo.kernels (setuptools package-dir). Imported as a bare
    # `kernels` (e.g. from the repository root) it would shadow the PyPI package of that name.
    raise ImportError(
        f"this package must be imported as `fastppo.kernels`, not `{__name__}`: "
        "install fastppo (`pip install -e .`) and `from fastppo.kernels import token_logprobs`"
    )

from fastppo.kernels.gae import gae, reward_to_go
from fastppo.kernels.kl import kl_penalty, kl_rewards
from fastppo.kernels.ppo_loss import ppo_loss
from fastppo.kernels.token_logprobs import token_logprobs
from fastppo.kernels.whiten import masked_whiten
from fastppo.reference import PPOLossOutput

__all__ = ["token_logprobs", "kl_penalty", "kl_rewards", "gae", "reward_to_go", "masked_whiten",
           "ppo_loss", "PPOLossOutput"]
