"""Custom torch ops around jmp_ext's C++/CUDA kernels.

Every op is a torch.library custom op with a fake (meta) implementation, so it works under
autograd and torch.compile, on CPU tensors and (in a CUDA build) on GPU tensors.
"""

from jmp_ext.ops._lib import build_info

__all__ = ["build_info"]
