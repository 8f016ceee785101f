// The vocabulary-parallel passes on CUDA: one block per row of one rank's columns, each pass a step of
// csrc/rows_row.h (the same host/device code as the distill_rows kernel, run by the CPU suite), split
// where the ranks exchange per-row numbers (docs/spec.md, "Tensor parallel"). Element math in float
// (double for float64 logits), row statistics and sums in double, fixed reduction trees.
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/block_reduce.cuh"
#include "cuda/device_math.cuh"
#include "cuda/vocab_parallel_launch.h"
#include "rows_row.h"

namespace fastkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class X>
struct ColumnLoad {
  const X* row;
  __device__ acc_of<X> operator()(int64_t j) const { return to_acc(row[j]); }
};

// The local column of a row's target, or -1 (ignore_index, or another rank's column).
__device__ int64_t local_target(const VpKernelArgs& a, int64_t row) {
  if (a.target == nullptr) return -1;
  const int64_t y = a.target[row];
  if (y == a.ignore_index || y < a.vocab_start || y >= a.vocab_start + a.vocab) return -1;
  return y - a.vocab_start;
}

// The global frame of a row, as passes 2 and 3 of rows_row.h take it.
template <class acc_t>
__device__ RowFrame<acc_t> global_frame(const VpKernelArgs& a, int64_t row) {
  const double* f = a.frame + row * kVpFrame;
  const auto shift = [](double m) { return m == -INFINITY ? 0.0 : m; };
  RowFrame<acc_t> fr;
  fr.max_t = acc_t(shift(f[kFrameMaxT]));
  fr.max_s = acc_t(shift(f[kFrameMaxS]));
  fr.inv_sum_t = acc_t(f[kFrameInvSumT]);
  fr.inv_sum_b = acc_t(f[kFrameInvSumB]);
  fr.inv_sum_1 = acc_t(f[kFrameInvSum1]);
  fr.inv_t = acc_t(a.inv_temperature);
  fr.delta = acc_t(f[kFrameDelta]);
  fr.beta = acc_t(a.beta);
  fr.one_minus_beta = acc_t(a.one_minus_beta);
  return fr;
}

template <class X>
__device__ void stats_row(const VpKernelArgs& a, int64_t row, const ColumnLoad<X>& s, const ColumnLoad<X>& t,
                          double* scratch) {
  using acc_t = acc_of<X>;
  const double inv_t = a.inv_temperature;
  const bool hard = a.target != nullptr;
  RowShare share = gather_row_share<acc_t, ScalarDevMath<acc_t>>(s, t, threadIdx.x, kThreads, a.vocab, acc_t(inv_t),
                                                                 hard);
  share = block_reduce<kThreads>(share, [inv_t](RowShare& x, const RowShare& o) { x.merge(o, inv_t); }, scratch);
  // Thread 0 writes; the others go on to the block's next row (grid-stride), whose reduction needs them all.
  if (threadIdx.x == 0) {
    double* out = a.out + row * kVpStats;
    out[kMaxT] = share.t.m;
    out[kSumT] = share.t.s;
    out[kMaxS] = share.b.m;
    out[kSumB] = share.b.s;
    // sum_1 relative to max_s (the same maximum as b's; moved onto it in case rounding differs).
    out[kSum1] = share.one.m == -INFINITY ? 0.0 : share.one.s * exp(share.one.m - share.b.m);
    out[kSumS] = share.sum_s;
    const int64_t y = local_target(a, row);
    out[kTargetLogit] = y >= 0 ? double(s(y)) : 0.0;
  }
}

template <class X, Divergence kKind>
__device__ void sums_row(const VpKernelArgs& a, int64_t row, const ColumnLoad<X>& s, const ColumnLoad<X>& t,
                         double* scratch) {
  using acc_t = acc_of<X>;
  const RowFrame<acc_t> fr = global_frame<acc_t>(a, row);
  DivergenceShare sums =
      gather_divergence_share<kKind, acc_t, ScalarDevMath<acc_t>>(s, t, fr, threadIdx.x, kThreads, a.vocab);
  sums = block_reduce<kThreads>(sums, [](DivergenceShare& x, const DivergenceShare& o) { x.merge(o); }, scratch);
  if (threadIdx.x == 0) {  // as in stats_row: every thread stays for the next row
    double* out = a.out + row * kVpSums;
    out[kSumF] = sums.f;
    out[kSumQg] = sums.qg;
    out[kSumPh] = sums.ph;
  }
}

// Pass 3. A row with neither coefficient gets zeros without reading it (a masked row's NaN stays out).
template <class X, Divergence kKind>
__device__ void gradients_row(const VpKernelArgs& a, int64_t row, const ColumnLoad<X>& s, const ColumnLoad<X>& t) {
  using acc_t = acc_of<X>;
  using M = ScalarDevMath<acc_t>;
  const double* k = a.coeffs + row * kVpCoeffs;
  X* gs = a.grad_student ? static_cast<X*>(a.grad_student) + row * a.vocab : nullptr;
  X* gt = a.grad_teacher ? static_cast<X*>(a.grad_teacher) + row * a.vocab : nullptr;
  const bool soft = k[kCoefSoft] != 0.0;
  const bool hard = a.target != nullptr && a.target[row] != a.ignore_index && k[kCoefHard] != 0.0;
  const RowFrame<acc_t> fr = global_frame<acc_t>(a, row);
  const acc_t cs = soft ? acc_t(k[kCoefSoft]) : acc_t(0), ch = hard ? acc_t(k[kCoefHard]) : acc_t(0);
  const acc_t qg_sum = acc_t(k[kCoefQgSum]), ph_sum = acc_t(k[kCoefPhSum]);
  const acc_t eps_v = hard ? acc_t(a.label_smoothing / double(a.global_vocab)) : acc_t(0);
  const acc_t y_coef = acc_t(1.0 - a.label_smoothing);
  const int64_t y = hard ? local_target(a, row) : -1;
  for (int64_t j = threadIdx.x; j < a.vocab; j += kThreads) {
    if (!soft && !hard) {
      if (gs) gs[j] = from_acc<X>(acc_t(0));
      if (gt) gt[j] = from_acc<X>(acc_t(0));
      continue;
    }
    const acc_t sv = s(j), tv = t(j);
    if (gs) gs[j] = from_acc<X>(student_grad<kKind, acc_t, M>(fr, sv, tv, cs, ch, qg_sum, eps_v, j == y ? y_coef : acc_t(0)));
    if (gt) gt[j] = from_acc<X>(teacher_grad<kKind, acc_t, M>(fr, sv, tv, cs, ph_sum));
  }
}

template <class X, Divergence kKind>
__global__ void __launch_bounds__(kThreads) vocab_parallel_kernel(VpKernelArgs a) {
  static_assert(kReduceDoubles<RowShare> >= kReduceDoubles<DivergenceShare>, "scratch holds the larger share");
  __shared__ double scratch[kWarps * kReduceDoubles<RowShare>];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const ColumnLoad<X> s{static_cast<const X*>(a.student) + row * a.student_row_stride};
    const ColumnLoad<X> t{static_cast<const X*>(a.teacher) + row * a.teacher_row_stride};
    switch (a.pass) {
      case VpPass::Stats: stats_row<X>(a, row, s, t, scratch); break;
      case VpPass::Sums: sums_row<X, kKind>(a, row, s, t, scratch); break;
      default: gradients_row<X, kKind>(a, row, s, t); break;
    }
  }
}

template <class X>
void launch_for(const VpKernelArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned(a.rows < 65535 ? a.rows : 65535);
  // Pass 1 does not depend on the divergence: one instance.
  const Divergence kind = a.pass == VpPass::Stats ? Divergence::ForwardKL : a.divergence;
  visit_divergence(kind, [&](auto k) { vocab_parallel_kernel<X, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(a); });
}

}  // namespace

void launch_vocab_parallel_kernel(const VpKernelArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return;
  visit_logit_type(a.dtype, [&](auto x) { launch_for<typename decltype(x)::type>(a, stream); });
}

}  // namespace fastkd::cuda
