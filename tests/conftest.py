import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when a kernel is defined, so it must be set before any test imports memkd.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
