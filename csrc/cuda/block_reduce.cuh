// Deterministic block-wide reductions of small structs of doubles (running log-sum-exps, sums): a
// fixed shuffle tree within each warp, then the warps' results folded in warp order, the same tree
// every run. Every thread of the block gets the result.
#pragma once

#include <cstring>

namespace fastkd::cuda {

// Doubles of scratch (shared memory) that block_reduce needs for a T, per warp.
template <class T>
constexpr int kReduceDoubles = int(sizeof(T) / sizeof(double));

template <class T>
__device__ __forceinline__ T shuffle_down(const T& v, int offset) {
  static_assert(sizeof(T) % sizeof(double) == 0, "block_reduce takes structs of doubles");
  double w[kReduceDoubles<T>];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kReduceDoubles<T>; ++i) w[i] = __shfl_down_sync(0xffffffffu, w[i], offset);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// merge(T& into, const T& other). scratch: kThreads / 32 * kReduceDoubles<T> doubles of shared
// memory; the barrier before it is written lets the previous reduction's readers finish with it.
template <int kThreads, class T, class Merge>
__device__ T block_reduce(T v, Merge merge, double* scratch) {
  constexpr int kWarps = kThreads / 32;
  constexpr int n = kReduceDoubles<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(v, shuffle_down(v, o));  // lane 0 ends with the warp's
  __syncthreads();
  if (lane == 0) memcpy(scratch + warp * n, &v, sizeof(T));
  __syncthreads();
  T total;
  memcpy(&total, scratch, sizeof(T));
  for (int w = 1; w < kWarps; ++w) {
    T other;
    memcpy(&other, scratch + w * n, sizeof(T));
    merge(total, other);
  }
  return total;
}

}  // namespace fastkd::cuda
