// The CUDA kernel of fastkd::distill_rows: any divergence (csrc/divergence_row.h), per-row terms, the
// gradients weighted by the caller's device weights. One block per row, three passes over the row
// (the later ones mostly hit L2): softmax statistics, the divergence's three sums, the gradients, each
// a step of csrc/rows_row.h (host and device code: the CPU suite runs it). Element math in float
// (double for float64 logits), row statistics and sums in double. Deterministic: fixed reduction
// trees, no atomics. The weights, the per-row float16 pre-scales and every normaliser stay on the
// device: no host synchronisation.
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/block_reduce.cuh"
#include "cuda/device_math.cuh"
#include "cuda/rows_launch.h"
#include "rows_row.h"

namespace fastkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Loads one logit of a row as acc_t.
template <class X>
struct RowLoad {
  const X* row;
  __device__ acc_of<X> operator()(int64_t j) const { return to_acc(row[j]); }
};

template <class X, Divergence kKind>
__global__ void __launch_bounds__(kThreads) rows_kernel(RowsKernelArgs a) {
  using acc_t = acc_of<X>;
  using M = ScalarDevMath<acc_t>;
  static_assert(kReduceDoubles<RowShare> >= kReduceDoubles<DivergenceShare>, "scratch holds the larger share");
  __shared__ double scratch[kWarps * kReduceDoubles<RowShare>];
  const int64_t V = a.vocab;
  const double inv_t = a.inv_temperature;
  const double w_soft = a.weights[0], w_hard = a.weights[1];

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowLoad<X> s{static_cast<const X*>(a.student) + row * a.student_row_stride};
    const RowLoad<X> t{static_cast<const X*>(a.teacher) + row * a.teacher_row_stride};
    X* gs = a.grad_student ? static_cast<X*>(a.grad_student) + row * V : nullptr;
    X* gt = a.grad_teacher ? static_cast<X*>(a.grad_teacher) + row * V : nullptr;
    const int64_t y = a.target ? a.target[row] : -1;
    const bool hard_row = a.target != nullptr && y != a.ignore_index;
    if (hard_row) CUDA_KERNEL_ASSERT(y >= 0 && y < V && "fastkd: target out of range [0, vocab)");
    const bool soft_row = a.soft_mask ? a.soft_mask[row] : (a.target == nullptr || hard_row);
    if (threadIdx.x == 0 && a.grad_scale != nullptr) {
      a.grad_scale[row] = 1.0f;
      a.grad_scale[a.rows + row] = 1.0f;
    }
    if (!soft_row && !hard_row) {
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        if (gs) gs[j] = from_acc<X>(acc_t(0));
        if (gt) gt[j] = from_acc<X>(acc_t(0));
      }
      if (threadIdx.x == 0) a.row_loss[row] = a.row_soft[row] = a.row_hard[row] = 0;
      continue;
    }

    // Pass 1: softmax statistics of t / T, s / T and s (the cross-entropy), and sum s.
    RowShare share = gather_row_share<acc_t, M>(s, t, threadIdx.x, kThreads, V, acc_t(inv_t), hard_row);
    share = block_reduce<kThreads>(share, [inv_t](RowShare& x, const RowShare& o) { x.merge(o, inv_t); }, scratch);
    const RowFrame<acc_t> frame = row_frame<acc_t>(share, inv_t, DivergenceParams{a.divergence, a.beta, a.one_minus_beta});

    // Pass 2: the divergence's sums, and the largest |qg| and |ph| for the float16 pre-scale.
    DivergenceShare sums = gather_divergence_share<kKind, acc_t, M>(s, t, frame, threadIdx.x, kThreads, V);
    sums = block_reduce<kThreads>(sums, [](DivergenceShare& x, const DivergenceShare& o) { x.merge(o); }, scratch);
    const double soft = soft_row ? sums.f : 0.0;
    const double hard = hard_row ? row_cross_entropy(share, double(s(y)), V, a.label_smoothing) : 0.0;
    if (threadIdx.x == 0) {
      a.row_soft[row] = soft;
      a.row_hard[row] = hard;
      a.row_loss[row] = w_soft * soft + w_hard * hard;
    }
    if (!gs && !gt) continue;

    // Pass 3: the gradients.
    const GradientCoeffs c = gradient_coeffs(sums, 1.0 / share.t.s, 1.0 / share.b.s, w_soft, w_hard, inv_t,
                                             soft_row, hard_row, a.fp16_student && gs, a.fp16_teacher && gt);
    if (threadIdx.x == 0 && a.grad_scale != nullptr) {
      a.grad_scale[row] = float(c.prescale_student);
      a.grad_scale[a.rows + row] = float(c.prescale_teacher);
    }
    const acc_t cs = acc_t(c.cs_student), ch = acc_t(c.ch_student), ct = acc_t(c.cs_teacher);
    const acc_t qg_sum = acc_t(sums.qg), ph_sum = acc_t(sums.ph);
    const acc_t eps_v = acc_t(a.label_smoothing / double(V)), y_coef = acc_t(1.0 - a.label_smoothing);
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const acc_t sv = s(j), tv = t(j);
      if (gs) {
        gs[j] = from_acc<X>(student_grad<kKind, acc_t, M>(frame, sv, tv, cs, ch, qg_sum, hard_row ? eps_v : acc_t(0),
                                                          j == y ? y_coef : acc_t(0)));
      }
      if (gt) gt[j] = from_acc<X>(teacher_grad<kKind, acc_t, M>(frame, sv, tv, ct, ph_sum));
    }
  }
}

template <class X>
void launch_for(const RowsKernelArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.rows < 65535 ? a.rows : 65535;
  visit_divergence(a.divergence, [&](auto kind) {
    rows_kernel<X, decltype(kind)::value><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  });
}

}  // namespace

void launch_rows_kernel(const RowsKernelArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return;
  visit_logit_type(a.dtype, [&](auto x) { launch_for<typename decltype(x)::type>(a, stream); });
}

}  // namespace fastkd::cuda
