import os

import pytest
import torch

# The Triton kernels run on CPU through Triton's interpreter when there is no GPU. The variable must be
# set before triton is first imported, which is why it lives here and nowhere else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The engine tests' small demo run (tests/engine): enough steps to learn, few enough to be quick.
SMALL = dict(sft_steps=120, rm_steps=120, ppo_iterations=4)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A short demo run (SFT, RM and PPO checkpoints, data) that the engine tests start from."""
    from fastppo.demo import DemoConfig, demo

    out = tmp_path_factory.mktemp("demo")
    summary = demo(DemoConfig(str(out), **SMALL), quiet=True)
    return out, summary
