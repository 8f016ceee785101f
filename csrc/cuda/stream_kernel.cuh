// The streaming kernel: one block per row (one warp per row for short rows, several rows per block),
// two passes over the row in global memory. Pass 1 gathers the exp2-form sums online (each thread
// keeps running maxima and rescales its sums when they grow); pass 2 walks the row backwards, so the
// lines pass 1 read last, the likeliest still in L2, are read first, and writes the gradient.
// It runs on every arch and dtype, and is the fallback of the resident kernel.
#pragma once

#include "cuda/row_common.cuh"

namespace fastkd::cuda {

template <class acc_t>
struct OnlineSums {
  acc_t max_t = neg_inf<acc_t>();
  acc_t max_s = neg_inf<acc_t>();
  Exp2Shifts<acc_t> sh;
  Exp2Sums<acc_t> x;
};

// Chunks of N elements per load (a 16-byte vector, or 1 for unaligned rows) and U chunks per step:
// 16 elements of each stream in flight per thread (32 to 64 bytes), two blocks per SM unspilled.
template <int N>
constexpr int steps_unroll() {
  return N == 1 ? 8 : (N == 2 ? 4 : 16 / N);
}

template <class X, bool kSoft, bool kHard, int kTMode, int N>
__device__ __forceinline__ void stream_row(const KernelArgs& k, int64_t row, int lane, int lanes,
                                           acc_of<X>* red_max, acc_of<X>* red_sum, double* red_refine) {
  using acc_t = acc_of<X>;
  using M = DevMath<acc_t>;
  constexpr int U = steps_unroll<N>();
  const DistillLaunch& a = k.a;
  const int64_t V = a.vocab;
  const int64_t y = row_target(a, row);
  if (row_masked(a, y)) {
    zero_row_grads<X>(k, row, 0, V, lane, lanes);
    if (lane == 0) write_row<acc_t>(a, row, 0, 0, 0);
    return;
  }
  const X* srow = static_cast<const X*>(a.student) + row * a.student_row_stride;
  const X* trow = kSoft ? static_cast<const X*>(a.teacher) + row * a.teacher_row_stride : nullptr;
  const acc_t s_target = kHard ? to_acc(srow[y]) : acc_t(0);
  const int64_t nchunks = V / N;
  const int64_t stride = int64_t(lanes) * U;

  // ---- pass 1: online sums
  OnlineSums<acc_t> o;
  o.sh = exp2_shifts<kTMode>(o.max_t, o.max_s, a.params);
  for (int64_t base = lane; base < nchunks; base += stride) {
    acc_t s[U][N], t[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + int64_t(u) * lanes;
      if (c < nchunks) {
        load_chunk<X, N, false>(srow + c * N, s[u]);
        if constexpr (kSoft) load_chunk<X, N, false>(trow + c * N, t[u]);
      }
    }
    acc_t step_t = neg_inf<acc_t>(), step_s = neg_inf<acc_t>();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + int64_t(u) * lanes < nchunks) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          step_s = dmax(step_s, s[u][i]);
          if constexpr (kSoft) step_t = dmax(step_t, t[u][i]);
        }
      }
    }
    if (step_t > o.max_t || step_s > o.max_s) {  // rare after the first steps
      const acc_t new_t = dmax(o.max_t, step_t), new_s = dmax(o.max_s, step_s);
      const Exp2Shifts<acc_t> sh = exp2_shifts<kTMode>(new_t, new_s, a.params);
      exp2_move<M>(o.x, o.max_t, o.max_s, o.sh, sh);
      o.sh = sh;
      o.max_t = new_t;
      o.max_s = new_s;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + int64_t(u) * lanes < nchunks) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          exp2_accumulate<M, kSoft, kHard, kTMode>(o.x, s[u][i], kSoft ? t[u][i] : acc_t(0), o.sh);
        }
      }
    }
  }

  // ---- merge the row's threads: maxima first, then every thread moves its sums onto the row's shifts
  acc_t mx[2] = {o.max_t, o.max_s};
  if (k.warp_per_row) {
    mx[0] = warp_max(mx[0]);
    mx[1] = warp_max(mx[1]);
  } else {
    block_combine<true, 2>(mx, red_max);
  }
  const Exp2Shifts<acc_t> sh = exp2_shifts<kTMode>(mx[0], mx[1], a.params);
  exp2_move<M>(o.x, o.max_t, o.max_s, o.sh, sh);
  acc_t sums[5];
  o.x.to_array(sums);
  acc_t max_d = o.x.max_d;
  if (k.warp_per_row) {
#pragma unroll
    for (int i = 0; i < 5; ++i) sums[i] = warp_sum(sums[i]);
    max_d = warp_max(max_d);
  } else {
    block_combine<false, 5>(sums, red_sum);
    acc_t md[1] = {max_d};
    block_combine<true, 1>(md, red_max + 2 * kMaxWarps);  // its own scratch: no barrier needed
    max_d = md[0];
  }
  const Exp2Sums<acc_t> x = Exp2Sums<acc_t>::from_array(sums, max_d);
  const FinishedRow<acc_t> fin = finish_row(a, row, x, mx[1], sh, s_target, lane == 0);
  const Exp2Coeffs<acc_t>& c = fin.c;

  // ---- pass 2: the gradient (and the KL refinement sum), last chunks first
  X* gs_row = a.grad_student != nullptr ? static_cast<X*>(a.grad_student) + row * V : nullptr;
  X* gt_row = kSoft && a.grad_teacher != nullptr ? static_cast<X*>(a.grad_teacher) + row * V : nullptr;
  const bool refine = kSoft && c.refine;  // the same for every thread of the row
  if (gs_row == nullptr && gt_row == nullptr && !refine) return;
  acc_t refine_sum = 0;
  const int64_t my_steps = lane < nchunks ? (nchunks - 1 - lane) / stride + 1 : 0;
  for (int64_t it = my_steps - 1; it >= 0; --it) {
    const int64_t base = lane + it * stride;
    acc_t s[U][N], t[U][N];
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
      const int64_t ch = base + int64_t(u) * lanes;
      if (ch < nchunks) {
        load_chunk<X, N, true>(srow + ch * N, s[u]);
        if constexpr (kSoft) load_chunk<X, N, true>(trow + ch * N, t[u]);
      }
    }
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
      const int64_t ch = base + int64_t(u) * lanes;
      if (ch < nchunks) {
        acc_t gs[N], gt[N];
        if constexpr (!kSoft) {
#pragma unroll
          for (int i = 0; i < N; ++i) t[u][i] = acc_t(0);
        }
        grad_chunk<kSoft, kHard, kTMode, N>(s[u], t[u], c, ch * N, y, gt_row != nullptr, gs, gt);
        if (gs_row != nullptr) store_chunk<X, N>(gs_row + ch * N, gs);
        if constexpr (kSoft) {
          if (gt_row != nullptr) store_chunk<X, N>(gt_row + ch * N, gt);
          if (refine) refine_sum += refine_chunk<N>(s[u], t[u], c);
        }
      }
    }
  }
  if (refine) {
    double r[1] = {double(refine_sum)};
    if (k.warp_per_row) {
      r[0] = warp_sum(r[0]);
    } else {
      block_combine<false, 1>(r, red_refine);
    }
    if (lane == 0) write_refined_row<acc_t>(a, row, fin.loss, r[0]);
  }
}

template <class X, bool kSoft, bool kHard, int kTMode>
__global__ void __launch_bounds__(kThreads, 2) stream_kernel(const KernelArgs k) {
  using acc_t = acc_of<X>;
  __shared__ acc_t red_max[kMaxWarps * 3];  // maxima of t and s, then of d
  __shared__ acc_t red_sum[kMaxWarps * 5];
  __shared__ double red_refine[kMaxWarps];
  int lane, lanes;
  int64_t row;
  if (k.warp_per_row) {
    lanes = 32;
    lane = threadIdx.x % 32;
    row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= k.a.rows) return;  // no block barriers in this mode
  } else {
    lanes = blockDim.x;
    lane = threadIdx.x;
    row = blockIdx.x;
  }
  if (k.vec) {
    stream_row<X, kSoft, kHard, kTMode, kVecElems<X>>(k, row, lane, lanes, red_max, red_sum, red_refine);
  } else {
    stream_row<X, kSoft, kHard, kTMode, 1>(k, row, lane, lanes, red_max, red_sum, red_refine);
  }
}

}  // namespace fastkd::cuda
