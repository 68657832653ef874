// CUDA backend of the interaction indices: one thread per output edge runs the same per-edge
// functions as the CPU loops (count_triplets_of, fill_triplets_of, ... in interaction_indices.h),
// so both devices produce identical indices in the identical order. Each thread writes only its
// own edge's range of the output, so there are no atomics and the result is deterministic.
#include "common/cuda_helpers.h"
#include "interaction_indices/interaction_indices.h"

namespace jmp_ext::interaction_indices::cuda {

namespace {

using jmp_ext::cuda::grid_for;
using jmp_ext::cuda::grid_start;
using jmp_ext::cuda::grid_stride;
using jmp_ext::cuda::kBlock;

template <class Index>
__global__ void count_triplets_kernel(TripletArgs<Index> args) {
  for (int64_t o = grid_start(); o < args.out.num_edges; o += grid_stride())
    args.offsets[o + 1] = count_triplets_of(args, o);
}

template <class Index>
__global__ void fill_triplets_kernel(TripletArgs<Index> args) {
  for (int64_t o = grid_start(); o < args.out.num_edges; o += grid_stride())
    fill_triplets_of(args, o);
}

template <class Index>
__global__ void count_quadruplets_kernel(QuadArgs<Index> args) {
  for (int64_t ca = grid_start(); ca < args.main.num_edges; ca += grid_stride())
    args.offsets[ca + 1] = count_quadruplets_of(args, ca);
}

template <class Index>
__global__ void fill_quadruplets_kernel(QuadArgs<Index> args) {
  for (int64_t ca = grid_start(); ca < args.main.num_edges; ca += grid_stride())
    fill_quadruplets_of(args, ca);
}

// Launches kernel(args) over n output edges (nothing for n == 0).
template <class Args>
void launch(void (*kernel)(Args), const Args& args, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  kernel<<<grid_for(n), kBlock, 0, stream>>>(args);
  jmp_ext::cuda::check_launch();
}

}  // namespace

template <class Index>
void count_triplets(const TripletArgs<Index>& args, cudaStream_t stream) {
  launch(count_triplets_kernel<Index>, args, args.out.num_edges, stream);
}

template <class Index>
void fill_triplets(const TripletArgs<Index>& args, cudaStream_t stream) {
  launch(fill_triplets_kernel<Index>, args, args.out.num_edges, stream);
}

template <class Index>
void count_quadruplets(const QuadArgs<Index>& args, cudaStream_t stream) {
  launch(count_quadruplets_kernel<Index>, args, args.main.num_edges, stream);
}

template <class Index>
void fill_quadruplets(const QuadArgs<Index>& args, cudaStream_t stream) {
  launch(fill_quadruplets_kernel<Index>, args, args.main.num_edges, stream);
}

#define JMP_EXT_INSTANTIATE(Index)                                                     \
  template void count_triplets(const TripletArgs<Index>&, cudaStream_t);             \
  template void fill_triplets(const TripletArgs<Index>&, cudaStream_t);              \
  template void count_quadruplets(const QuadArgs<Index>&, cudaStream_t);             \
  template void fill_quadruplets(const QuadArgs<Index>&, cudaStream_t);
JMP_EXT_INSTANTIATE(int32_t)
JMP_EXT_INSTANTIATE(int64_t)
#undef JMP_EXT_INSTANTIATE

}  // namespace jmp_ext::interaction_indices::cuda
