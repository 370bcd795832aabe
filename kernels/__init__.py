"""fastppo.kernels: fused Triton kernels for PPO, computed directly from logits. Public, stable API.

Every op takes `backend=`: "triton" (the fused kernels), "native" (C++ CPU kernels, csrc/), "torch"
(the plain-PyTorch reference in `fastppo.kernels.reference`, evaluated in chunks) or "auto" (Triton on
CUDA tensors; on CPU the native kernels where the op has them and they build, else the reference).
FASTPPO_BACKEND in the environment replaces "auto".

Self-contained: nothing here imports the engine (fastppo's trainers, transformers, the configs).
One file per public op; what the ops stand on is in the private `_*.py` modules beside them.
"""
if __name__ != "fastppo.kernels":
    # This directory is installed as fastppo.kernels (setuptools package-dir). A Python process
    # started in the repository root (`python -m fastppo`, `torchrun -m fastppo`, a notebook) has
    # the root first on sys.path, so a bare `import kernels` lands here instead of on the PyPI
    # distribution of that name (Hugging Face's kernel hub), which recent transformers import at
    # start-up. Hand the import over to that distribution when it is installed; otherwise stay an
    # empty package that fails loudly on use (transformers probes for one by importing it, and must
    # then find no package here: no __file__, no __version__).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _installed_elsewhere():
        """The spec of a `kernels` package on sys.path outside this repository's root, or None."""
        root = _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__)))
        path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]
        return _machinery.PathFinder.find_spec(__name__, path)

    _spec = _installed_elsewhere() if __name__ == "kernels" else None
    if _spec is not None:
        # The import system returns sys.modules[__name__] once this file has run: the real package.
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            del _sys.modules[__name__]
            raise
    else:
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
    from fastppo.kernels.truncation import truncation_threshold
    from fastppo.kernels.whiten import masked_whiten
    from fastppo.kernels.reference import PPOLossOutput

    __all__ = ["token_logprobs", "kl_penalty", "kl_rewards", "gae", "reward_to_go", "masked_whiten",
               "ppo_loss", "linear_token_logprobs", "linear_ppo_loss", "group_advantages",
               "truncation_threshold", "PPOLossOutput"]
