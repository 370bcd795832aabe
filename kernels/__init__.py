"""fastppo.kernels: fused Triton kernels for PPO, computed directly from logits. Public, stable API.

Every op takes `backend=`: "triton" (the fused kernels), "native" (C++ CPU kernels, csrc/), "torch"
(the plain-PyTorch reference in `fastppo.kernels.reference`, evaluated in chunks) or "auto" (Triton on
CUDA tensors; on CPU the native kernels where the op has them and they build, else the reference).
FASTPPO_BACKEND in the environment replaces "auto".

Self-contained: nothing here imports the engine (fastppo's trainers, transformers, the configs).
One file per public op; what the ops stand on is in the private `_*.py` modules beside them.
"""
if __name__ != "fastppo.kernels":
    # This directory is installed as fastppo.kernels (setuptools package-dir). Reached as a bare
    # `kernels` (from the repository root) it shadows the PyPI package of that name. Every use then
    # fails loudly; the import itself does not, because transformers probes for a `kernels` package
    # by importing it, and must find no package here (no __file__, no __version__) rather than crash.
    _MESSAGE = (f"this package must be imported as `fastppo.kernels`, not `{__name__}`: install "
                "fastppo (`pip install -e .`) and `from fastppo.kernels import token_logprobs`")
    del globals()["__file__"]

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(_MESSAGE)
else:
    from fastppo.kernels.gae import gae, reward_to_go
    from fastppo.kernels.group_advantages import group_advantages
    from fastppo.kernels.kl import kl_penalty, kl_rewards
    from fastppo.kernels.linear import linear_ppo_loss, linear_token_logprobs
    from fastppo.kernels.ppo_loss import ppo_loss
    from fastppo.kernels.token_logprobs import token_logprobs
    from fastppo.kernels.whiten import masked_whiten
    from fastppo.kernels.reference import PPOLossOutput

    __all__ = ["token_logprobs", "kl_penalty", "kl_rewards", "gae", "reward_to_go", "masked_whiten",
               "ppo_loss", "linear_token_logprobs", "linear_ppo_loss", "group_advantages",
               "PPOLossOutput"]
