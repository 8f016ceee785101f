// The resident kernel: the row stays on chip, so HBM sees one read of the logits and one write of the
// gradient. A row is split over a thread-block cluster of `cluster` CTAs (1 on any arch; up to 16 on
// sm_90, see distill_dispatch.cuh); each CTA copies its slice into shared memory with cp.async and
// then works from there in three passes: maxima, sums (with the row's maxima known, so no rescaling),
// gradient. The CTAs of a row swap their partial maxima and sums through distributed shared memory;
// every CTA folds them in rank order, so all of them hold bit-identical coefficients.
#pragma once

#include <cooperative_groups.h>
#include <cuda_pipeline_primitives.h>

#include "cuda/row_common.cuh"

namespace fastkd::cuda {

// Cluster barrier halves (arrive: release, wait: acquire); only reached with cluster > 1, on sm_90+.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().barrier_arrive();
#else
  __trap();
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().barrier_wait();
#else
  __trap();
#endif
}

// The value `v` at index i of shared array `local` in the CTA of cluster rank `rank`.
template <class T>
__device__ __forceinline__ T peer_load(T* local, int rank, int i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, rank)[i];
#else
  __trap();
  return local[i];
#endif
}

template <class X, bool kSoft, bool kHard, int kTMode>
__global__ void __launch_bounds__(kThreads, 3) resident_kernel(const KernelArgs k) {
  using acc_t = acc_of<X>;
  using M = DevMath<acc_t>;
  constexpr int N = kVecElems<X>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red_max[kMaxWarps * 3];  // maxima of t and s, then of d
  __shared__ acc_t red_sum[kMaxWarps * 5];
  __shared__ double red_refine[kMaxWarps];
  // This CTA's part of the row, read by the rest of its cluster: maxima [0, 2), sums [2, 7), max_d [7].
  __shared__ acc_t xchg[8];
  __shared__ double xchg_refine;

  const DistillLaunch& a = k.a;
  const int cl = k.cluster;
  const int64_t row = blockIdx.x / cl;
  const int rank = int(blockIdx.x % cl);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t V = a.vocab;
  const int64_t lo = min(V, rank * k.slice);
  const int64_t hi = min(V, lo + k.slice);
  const int64_t y = row_target(a, row);
  if (row_masked(a, y)) {  // the whole cluster returns here, before any cluster barrier
    zero_row_grads<X>(k, row, lo, hi, tid, nthreads);
    if (rank == 0 && tid == 0) write_row<acc_t>(a, row, 0, 0, 0);
    return;
  }

  // ---- stage the slice: all copies in flight at once, no registers held
  X* sm_s = reinterpret_cast<X*>(smem_raw);
  X* sm_t = sm_s + k.slice;  // k.slice is a multiple of N: 16-byte aligned
  const X* srow = static_cast<const X*>(a.student) + row * a.student_row_stride + lo;
  const X* trow = kSoft ? static_cast<const X*>(a.teacher) + row * a.teacher_row_stride + lo : nullptr;
  const int64_t nch = (hi - lo) / N;
  for (int64_t c = tid; c < nch; c += nthreads) {
    __pipeline_memcpy_async(sm_s + c * N, srow + c * N, 16);
    if constexpr (kSoft) __pipeline_memcpy_async(sm_t + c * N, trow + c * N, 16);
  }
  __pipeline_commit();
  const acc_t s_target = kHard ? to_acc(static_cast<const X*>(a.student)[row * a.student_row_stride + y]) : acc_t(0);
  __pipeline_wait_prior(0);
  __syncthreads();

  // ---- pass 1: maxima
  ChunkMax<X> max_t, max_s;
#pragma unroll 2
  for (int64_t c = tid; c < nch; c += nthreads) {
    max_s.add(*reinterpret_cast<const uint4*>(sm_s + c * N));
    if constexpr (kSoft) max_t.add(*reinterpret_cast<const uint4*>(sm_t + c * N));
  }
  acc_t mx[2] = {kSoft ? acc_t(max_t.value()) : neg_inf<acc_t>(), acc_t(max_s.value())};
  block_combine<true, 2>(mx, red_max);
  if (cl > 1) {
    if (tid == 0) {
      xchg[0] = mx[0];
      xchg[1] = mx[1];
    }
    cluster_arrive();
    cluster_wait();
    for (int r = 0; r < cl; ++r) {
      mx[0] = dmax(mx[0], peer_load(xchg, r, 0));
      mx[1] = dmax(mx[1], peer_load(xchg, r, 1));
    }
  }

  // ---- pass 2: sums relative to the row's maxima
  const Exp2Shifts<acc_t> sh = exp2_shifts<kTMode>(mx[0], mx[1], a.params);
  Exp2Sums<acc_t> part;
#pragma unroll 2
  for (int64_t c = tid; c < nch; c += nthreads) {
    acc_t s[N], t[N];
    load_chunk<X, N, false>(sm_s + c * N, s);
    if constexpr (kSoft) load_chunk<X, N, false>(sm_t + c * N, t);
#pragma unroll
    for (int i = 0; i < N; ++i) exp2_accumulate<M, kSoft, kHard, kTMode>(part, s[i], kSoft ? t[i] : acc_t(0), sh);
  }
  acc_t sums[5];
  part.to_array(sums);
  acc_t max_d[1] = {part.max_d};
  block_combine<false, 5>(sums, red_sum);
  block_combine<true, 1>(max_d, red_max + 2 * kMaxWarps);
  if (cl > 1) {
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < 5; ++i) xchg[2 + i] = sums[i];
      xchg[7] = max_d[0];
    }
    cluster_arrive();
    cluster_wait();
#pragma unroll
    for (int i = 0; i < 5; ++i) sums[i] = acc_t(0);
    for (int r = 0; r < cl; ++r) {  // rank order: every CTA gets the same bits
#pragma unroll
      for (int i = 0; i < 5; ++i) sums[i] += peer_load(xchg, r, 2 + i);
      max_d[0] = dmax(max_d[0], peer_load(xchg, r, 7));
    }
    cluster_arrive();  // done reading the peers' shared memory; waited for below
  }
  const Exp2Sums<acc_t> x = Exp2Sums<acc_t>::from_array(sums, max_d[0]);
  const FinishedRow<acc_t> fin = finish_row(a, row, x, mx[1], sh, s_target, rank == 0 && tid == 0);
  const Exp2Coeffs<acc_t>& c = fin.c;
  const bool refine = kSoft && c.refine;  // the same in every CTA of the cluster
  acc_t refine_sum = 0;

  // ---- pass 3: the gradient of the slice, from shared memory
  X* gs_row = a.grad_student != nullptr ? static_cast<X*>(a.grad_student) + row * V + lo : nullptr;
  X* gt_row = kSoft && a.grad_teacher != nullptr ? static_cast<X*>(a.grad_teacher) + row * V + lo : nullptr;
  if (gs_row != nullptr || gt_row != nullptr || refine) {
#pragma unroll 2
    for (int64_t ch = tid; ch < nch; ch += nthreads) {
      acc_t s[N], t[N], gs[N], gt[N];
      load_chunk<X, N, false>(sm_s + ch * N, s);
      if constexpr (kSoft) {
        load_chunk<X, N, false>(sm_t + ch * N, t);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) t[i] = acc_t(0);
      }
      grad_chunk<kSoft, kHard, kTMode, N>(s, t, c, lo + ch * N, y, gt_row != nullptr, gs, gt);
      if (gs_row != nullptr) store_chunk<X, N>(gs_row + ch * N, gs);
      if constexpr (kSoft) {
        if (gt_row != nullptr) store_chunk<X, N>(gt_row + ch * N, gt);
        if (refine) refine_sum += refine_chunk<N>(s, t, c);
      }
    }
  }
  if (!refine) {
    if (cl > 1) cluster_wait();
    return;
  }
  // ---- the KL refinement (large T): one more exchange, rank 0 writes the row's terms
  double r[1] = {double(refine_sum)};
  block_combine<false, 1>(r, red_refine);
  if (cl > 1) {
    if (tid == 0) xchg_refine = r[0];
    cluster_wait();  // pairs with the arrive after the sums
    cluster_arrive();
    cluster_wait();  // every CTA's part is written
    if (rank == 0) {
      r[0] = 0;
      for (int q = 0; q < cl; ++q) r[0] += peer_load(&xchg_refine, q, 0);
    }
    cluster_arrive();
    cluster_wait();  // rank 0 has read them: the others may exit
  }
  if (rank == 0 && tid == 0) write_refined_row<acc_t>(a, row, fin.loss, r[0]);
}

}  // namespace fastkd::cuda
