"""Custom torch ops around jmp_ext's C++/CUDA kernels.

Every op is a torch.library custom op with a fake (meta) implementation, so it works under
autograd and torch.compile, on CPU tensors and (in a CUDA build) on GPU tensors.
"""

from jmp_ext.ops._lib import build_info
from jmp_ext.ops.gaussian_basis import gaussian_basis, gaussian_basis_expression
from jmp_ext.ops.interaction_indices import mixed_triplets, quadruplets, triplets
from jmp_ext.ops.radius_graph import edge_vectors, radius_graph
from jmp_ext.ops.reductions import (
    gather,
    padded_to_ragged,
    ragged_to_padded,
    scatter_mean,
    scatter_sum,
    segment_contract,
    segment_max,
    segment_mean,
    segment_outer,
    segment_sum,
)

__all__ = [
    "build_info",
    "edge_vectors",
    "gather",
    "gaussian_basis",
    "gaussian_basis_expression",
    "mixed_triplets",
    "padded_to_ragged",
    "quadruplets",
    "radius_graph",
    "ragged_to_padded",
    "scatter_mean",
    "scatter_sum",
    "segment_contract",
    "segment_max",
    "segment_mean",
    "segment_outer",
    "segment_sum",
    "triplets",
]
