"""Without CUDA, the kernel tests run the Triton kernels through Triton's interpreter on CPU tensors.

TRITON_INTERPRET has to be set before gptforge.kernels is imported: triton.jit reads it when it decorates a
kernel. With CUDA present it stays unset, the CPU variants skip and the `gpu` variants run compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
