"""Custom torch ops around jmp_ext's C++/CUDA kernels.

Every op is a torch.library custom op with a fake (meta) implementation, so it works under
autograd and torch.compile, on CPU tensors and (in a CUDA build) on GPU tensors.
"""

from jmp_ext.ops._lib import build_info
from jmp_ext.ops.interaction_indices import mixed_triplets, quadruplets, triplets

__all__ = ["build_info", "mixed_triplets", "quadruplets", "triplets"]
