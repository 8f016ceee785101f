// Per-row steps shared by the two distillation kernels (stream_kernel.cuh, resident_kernel.cuh): the
// row's target and mask, finishing a row from its merged sums, and the gradient of one chunk.
#pragma once

#include <c10/macros/Macros.h>

#include "cuda/device_math.cuh"
#include "cuda/launch.h"
#include "distill_row.h"

namespace fastkd::cuda {

// What a launch decided on top of the call itself.
struct KernelArgs {
  DistillLaunch a;
  bool vec = false;           // rows are read and written as 16-byte chunks
  bool warp_per_row = false;  // stream kernel: one warp per row, several rows per block
  int cluster = 1;            // resident kernel: CTAs (a thread-block cluster) per row
  int64_t slice = 0;          // resident kernel: elements of the row each CTA holds
};

constexpr int kThreads = 256;

// The row's target, or -1 without one. A target outside [0, V) that is not ignore_index is a
// device-side assert, as in torch's cross_entropy.
__device__ __forceinline__ int64_t row_target(const DistillLaunch& a, int64_t row) {
  if (a.target == nullptr) return -1;
  const int64_t y = a.target[row];
  if (y != a.ignore_index) {
    CUDA_KERNEL_ASSERT(y >= 0 && y < a.vocab && "target out of range [0, vocab)");
  }
  return y;
}

__device__ __forceinline__ bool row_masked(const DistillLaunch& a, int64_t y) {
  return a.target != nullptr && y == a.ignore_index;
}

template <class acc_t>
__device__ __forceinline__ void write_row(const DistillLaunch& a, int64_t row, acc_t loss, acc_t soft, acc_t hard) {
  static_cast<acc_t*>(a.row_loss)[row] = loss;
  static_cast<acc_t*>(a.row_soft)[row] = soft;
  static_cast<acc_t*>(a.row_hard)[row] = hard;
}

// Zeroes elements [lo, hi) of a masked row's gradients, thread `tid` of `nthreads`.
template <class X>
__device__ void zero_row_grads(const KernelArgs& k, int64_t row, int64_t lo, int64_t hi, int tid, int nthreads) {
  const int64_t base = row * k.a.vocab;
  void* const grads[2] = {k.a.grad_student, k.a.grad_teacher};
  for (void* g : grads) {
    if (g == nullptr) continue;
    X* p = static_cast<X*>(g) + base;
    constexpr int N = kVecElems<X>;
    if (k.vec && lo % N == 0 && hi % N == 0) {
      const acc_of<X> z[N] = {};
      for (int64_t j = lo + int64_t(tid) * N; j < hi; j += int64_t(nthreads) * N) store_chunk<X, N>(p + j, z);
    } else {
      const acc_of<X> z[1] = {};
      for (int64_t j = lo + tid; j < hi; j += nthreads) store_chunk<X, 1>(p + j, z);
    }
  }
}

template <class acc_t>
struct FinishedRow {
  Exp2Coeffs<acc_t> c;
  RowLoss<double> loss;
};

// Turns a row's merged frame sums into its terms and gradient coefficients; `writer` writes the terms
// now unless the KL refinement is due (then write_refined_row() after the gradient pass). finalize()
// runs in fp64 (a few dozen operations per row), as on the CPU.
template <class acc_t>
__device__ __forceinline__ FinishedRow<acc_t> finish_row(const DistillLaunch& a, int64_t row, const Exp2Sums<acc_t>& x,
                                                         acc_t max_s, const Exp2Shifts<acc_t>& sh, acc_t s_target,
                                                         bool writer) {
  const RowStats<double> st = exp2_row_stats<double>(x, max_s, sh);
  const double scale = a.scale_device != nullptr ? *a.scale_device : a.scale_host;
  RowCoeffs<double> c;
  const RowLoss<double> l = finalize<double>(st, double(s_target), a.params, scale, &c);
  const Exp2Coeffs<acc_t> e = exp2_coeffs<acc_t>(x, sh, c, a.params);
  if (writer && !e.refine) write_row<acc_t>(a, row, acc_t(l.loss), acc_t(l.soft), acc_t(l.hard));
  return {e, l};
}

// The row's terms once the refinement sum R is complete.
template <class acc_t>
__device__ __forceinline__ void write_refined_row(const DistillLaunch& a, int64_t row, RowLoss<double> l, double r) {
  refine_soft(l, r, a.params);
  write_row<acc_t>(a, row, acc_t(l.loss), acc_t(l.soft), acc_t(l.hard));
}

template <int N, class acc_t>
__device__ __forceinline__ acc_t refine_chunk(const acc_t (&s)[N], const acc_t (&t)[N], const Exp2Coeffs<acc_t>& c) {
  acc_t r = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) r += exp2_refinement_term<DevMath<acc_t>>(s[i], t[i], c);
  return r;
}

// Gradients of one chunk of N elements starting at column j0 (y: the row's target or -1).
template <bool kSoft, bool kHard, int kTMode, int N, class acc_t>
__device__ __forceinline__ void grad_chunk(const acc_t (&s)[N], const acc_t (&t)[N], const Exp2Coeffs<acc_t>& c,
                                           int64_t j0, int64_t y, bool want_teacher, acc_t (&gs)[N],
                                           acc_t (&gt)[N]) {
  using M = DevMath<acc_t>;
  if (kSoft && want_teacher) {
#pragma unroll
    for (int i = 0; i < N; ++i) exp2_element_grads<M, kSoft, kHard, kTMode, kSoft>(s[i], t[i], c, gs[i], gt[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) exp2_element_grads<M, kSoft, kHard, kTMode, false>(s[i], t[i], c, gs[i], gt[i]);
  }
  if constexpr (kHard) {
    const int64_t d = y - j0;  // the target's place in this chunk, checked once per chunk
    if (d >= 0 && d < N) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (i == d) gs[i] -= c.target_coef;
      }
    }
  }
}

}  // namespace fastkd::cuda
