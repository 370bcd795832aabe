"""fastppo: PPO for RLHF of language models, with fused Triton kernels computed from logits.

The kernels live in `fastppo.kernels`; their plain-PyTorch references in `fastppo.kernels.reference`.
"""
__version__ = "0.1.0"
