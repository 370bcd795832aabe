import os

import torch

# The Triton kernels run on CPU through Triton's interpreter when there is no GPU. The variable must be
# set before triton is first imported, which is why it lives here and nowhere else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
