// The CUDA kernel of fastkd::sparse_distill_rows (docs/spec.md, "Sparse (top-k) teacher"): per-row
// terms and the dense student gradient, the teacher's K slots through the slot math of sparse_row.h
// that the CPU kernel shares. One block per row (a grid-stride loop over rows):
//   - the row's valid slots are marked in the block's bitmap of the vocabulary (which also checks the
//     indices: device-side asserts, as for targets);
//   - one pass over the student row: the log-sum-exps at T and at 1, sum s and, for tail "bucket",
//     the log-sum-exp at T of the entries off the support (q_tail is summed, never 1 - sum);
//   - the slots' two block reductions in float64;
//   - for float16 gradients, the row's pre-scale (a bound on its largest entry brought near 2^12);
//   - one pass writing the dense gradient, then, after a barrier, each valid slot's index rewritten
//     with its correction (one thread per slot: the indices of a row are distinct).
// Element math in float (double for float64 logits), the row's statistics and the slots in double.
// Deterministic: fixed reduction trees, no atomics on floats. The weights, the fp16 pre-scales and every
// normaliser stay on the device: no host synchronisation.
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/block_reduce.cuh"
#include "cuda/device_math.cuh"
#include "cuda/sparse_launch.h"
#include "sparse_row.h"

namespace fastkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kScratchDoubles = kThreads / 32 * kReduceDoubles<SlotSums<double>>;  // the largest reduced

__device__ __forceinline__ int64_t slot_index(const SparseKernelArgs& a, int64_t flat) {
  return a.indices_int64 ? static_cast<const int64_t*>(a.indices)[flat]
                         : int64_t(static_cast<const int32_t*>(a.indices)[flat]);
}

// Sets (or clears) the bits of the row's valid slots. Setting checks the indices as the CPU op does
// on the host: in [0, vocab), and listed once per row (the slot corrections below rely on it). A slot
// out of range is never marked nor read, also in builds where device asserts are off.
__device__ void mark_support(const SparseKernelArgs& a, int64_t row, uint32_t* bits, bool set) {
  for (int64_t c = threadIdx.x; c < a.k; c += kThreads) {
    if (is_padding(a.values[row * a.k + c])) continue;
    const int64_t j = slot_index(a, row * a.k + c);
    if (set) CUDA_KERNEL_ASSERT(j >= 0 && j < a.vocab && "fastkd: SparseTeacher index out of range [0, vocab)");
    if (j < 0 || j >= a.vocab) continue;
    const uint32_t bit = 1u << (j & 31);
    if (set) {
      const uint32_t before = atomicOr(bits + (j >> 5), bit);
      CUDA_KERNEL_ASSERT(!(before & bit) && "fastkd: SparseTeacher lists an index twice in a row");
    } else {
      atomicAnd(bits + (j >> 5), ~bit);
    }
  }
}

// The bitmap is read from L2 (where the atomics live), never from a stale L1 line.
__device__ __forceinline__ bool on_support(const uint32_t* bits, int64_t j) {
  return (__ldcg(bits + (j >> 5)) >> (j & 31)) & 1u;
}

template <class X>
class SparseRowPass {
  using acc_t = acc_of<X>;
  using M = ScalarDevMath<acc_t>;

 public:
  __device__ SparseRowPass(const SparseKernelArgs& a, int64_t row, const uint32_t* support, double* scratch)
      : a_(a),
        row_(row),
        support_(support),
        scratch_(scratch),
        inv_t_(a.sparse.inv_temperature),
        s_(static_cast<const X*>(a.student) + row * a.student_row_stride),
        g_(a.grad_student ? static_cast<X*>(a.grad_student) + row * a.vocab : nullptr),
        y_(a.target ? a.target[row] : -1),
        hard_row_(a.target != nullptr && y_ != a.ignore_index),
        soft_row_(a.soft_mask ? a.soft_mask[row] : (a.target == nullptr || hard_row_)) {}

  __device__ void run() {
    const int64_t V = a_.vocab;
    if (hard_row_) CUDA_KERNEL_ASSERT(y_ >= 0 && y_ < V && "fastkd: target out of range [0, vocab)");
    if (threadIdx.x == 0 && a_.grad_scale != nullptr) a_.grad_scale[row_] = 1.0f;
    if (!soft_row_ && !hard_row_) {  // masked: terms and gradient exactly 0
      if (g_) {
        for (int64_t j = threadIdx.x; j < V; j += kThreads) g_[j] = from_acc<X>(acc_t(0));
      }
      if (threadIdx.x == 0) a_.row_loss[row_] = a_.row_soft[row_] = a_.row_hard[row_] = 0;
      return;
    }
    student_pass();
    SparseRow<double> r;
    r.empty = true;
    if (soft_row_) r = teacher_terms();
    const double soft = r.empty ? 0.0 : r.soft;
    double hard = 0;
    if (hard_row_) {
      hard = cross_entropy_term(max1_ + log_sum1_, student_at(y_), sum_s_, V, a_.label_smoothing);
    }
    if (threadIdx.x == 0) {
      a_.row_soft[row_] = soft;
      a_.row_hard[row_] = hard;
      a_.row_loss[row_] = a_.weights[0] * soft + a_.weights[1] * hard;
    }
    if (g_) write_gradient(r, a_.fp16_grad ? fp16_prescale(r) : 1.0);
  }

 private:
  // s_j in float64; NaN for an index out of range (only reachable where device asserts are off).
  __device__ double student_at(int64_t j) const {
    return j >= 0 && j < a_.vocab ? double(to_acc(s_[j])) : NAN;
  }

  // Element exps in acc_t (ExpSum), the row's statistics in float64.
  __device__ void student_pass() {
    const bool tail = soft_row_ && a_.sparse.bucket;
    const acc_t k = acc_t(inv_t_);
    ExpSum<acc_t, M> eb, e1, eoff;
    FlushedSum<acc_t> sum_s;
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) {
      const acc_t sv = to_acc(s_[j]);
      eb.add(sv, k);
      if (hard_row_) {
        e1.add(sv, acc_t(1));
        sum_s.add(sv);
      }
      if (tail && !on_support(support_, j)) eoff.add(sv, k);
    }
    const double inv_t = inv_t_;
    const auto merge_at_t = [inv_t](LogSumExp<double>& x, const LogSumExp<double>& o) { x.merge(o, inv_t); };
    const LogSumExp<double> sb = block_reduce<kThreads>(eb.total(), merge_at_t, scratch_);
    // The slots' shift: the row maximum, or 0 for an all -inf row (exp(-inf - 0) = 0 keeps the sums
    // exact, as on the CPU).
    shift_ = sb.m == -INFINITY ? 0.0 : sb.m;
    log_sum_b_ = sb.shifted(shift_, inv_t);
    if (hard_row_) {
      const LogSumExp<double> s1 = block_reduce<kThreads>(
          e1.total(), [](LogSumExp<double>& x, const LogSumExp<double>& o) { x.merge(o, 1.0); }, scratch_);
      max1_ = s1.m == -INFINITY ? 0.0 : s1.m;
      log_sum1_ = s1.shifted(max1_, 1.0);
      sum_s_ = block_reduce<kThreads>(sum_s.total(), [](double& x, const double& o) { x += o; }, scratch_);
    }
    if (tail) {
      const LogSumExp<double> off = block_reduce<kThreads>(eoff.total(), merge_at_t, scratch_);
      lq_tail_ = off.shifted(shift_, inv_t) - log_sum_b_;
    }
  }

  // The student's full-vocabulary log q at slot c's index.
  __device__ double slot_lq(int64_t c) const {
    return student_log_q(student_at(slot_index(a_, row_ * a_.k + c)), shift_, inv_t_, log_sum_b_);
  }

  __device__ double slot_value(int64_t c) const { return a_.values[row_ * a_.k + c]; }

  __device__ SparseRow<double> teacher_terms() {
    SlotSums<double> sums;
    for (int64_t c = threadIdx.x; c < a_.k; c += kThreads) {
      const double v = slot_value(c);
      if (!is_padding(v)) sums.add(v, slot_lq(c), a_.sparse);
    }
    const double inv_t = inv_t_;
    sums = block_reduce<kThreads>(sums, [inv_t](SlotSums<double>& x, const SlotSums<double>& o) { x.merge(o, inv_t); },
                                  scratch_);
    SparseRow<double> r = sparse_row(sums, a_.sparse, lq_tail_);
    if (r.empty) return r;  // nothing to distil: no soft term
    ClassSums<double> classes;
    for (int64_t c = threadIdx.x; c < a_.k; c += kThreads) {
      const double v = slot_value(c);
      if (!is_padding(v)) classes.add(sparse_slot_terms(r, v, slot_lq(c)).e);
    }
    classes = block_reduce<kThreads>(classes, [](ClassSums<double>& x, const ClassSums<double>& o) { x.merge(o); },
                                     scratch_);
    finish_sparse_row(r, classes);
    return r;
  }

  // A float16 gradient's pre-scale for this row: the power of two that brings a bound on its largest
  // entry near 2^12. The dense part is at most |factor| max_j q_j (q at the row maximum, exp(-log sum))
  // plus the cross-entropy's 1; the slots add their corrections.
  __device__ double fp16_prescale(const SparseRow<double>& r) {
    const double cs = r.empty ? 0.0 : ::fabs(a_.weights[0] * inv_t_);
    double max_corr = 0;
    for (int64_t c = threadIdx.x; c < a_.k && cs != 0.0; c += kThreads) {
      const double v = slot_value(c);
      if (!is_padding(v)) max_corr = nan_max(max_corr, ::fabs(sparse_slot_correction(r, sparse_slot_terms(r, v, slot_lq(c)))));
    }
    max_corr = block_reduce<kThreads>(max_corr, [](double& x, const double& o) { x = nan_max(x, o); }, scratch_);
    const double dense = ::fabs(r.factor) * ::exp(-log_sum_b_);
    const double bound = cs * (dense + max_corr) + (hard_row_ ? ::fabs(a_.weights[1]) : 0.0);
    const double prescale = fp16_gradient_prescale(bound);
    if (threadIdx.x == 0 && a_.grad_scale != nullptr) a_.grad_scale[row_] = float(prescale);
    return prescale;
  }

  // The dense part in acc_t: q_j = exp((s_j - shift) / T) / sum_b, r_j = exp(s_j - max) / sum_1.
  __device__ void write_gradient(const SparseRow<double>& r, double prescale) {
    const int64_t V = a_.vocab;
    const double eps = a_.label_smoothing;
    const double cs = r.empty ? 0.0 : a_.weights[0] * prescale * inv_t_;
    const acc_t coef_q = acc_t(cs * r.factor * ::exp(-log_sum_b_));
    const acc_t ch = acc_t(hard_row_ ? a_.weights[1] * prescale * ::exp(-log_sum1_) : 0.0);
    const acc_t ch_rest = acc_t(hard_row_ ? a_.weights[1] * prescale : 0.0);
    const acc_t eps_v = acc_t(eps / double(V)), y_coef = acc_t(1.0 - eps);
    const acc_t shift = acc_t(shift_), max1 = acc_t(max1_), k = acc_t(inv_t_);
    const auto dense = [&](int64_t j, acc_t sv) {
      acc_t g = coef_q == acc_t(0) ? acc_t(0) : coef_q * M::exp((sv - shift) * k);
      if (ch_rest != acc_t(0)) g += ch * M::exp(sv - max1) - ch_rest * (eps_v + (j == y_ ? y_coef : acc_t(0)));
      return g;
    };
    for (int64_t j = threadIdx.x; j < V; j += kThreads) g_[j] = from_acc<X>(dense(j, to_acc(s_[j])));
    if (cs == 0.0) return;
    // The slots' entries are rewritten whole (dense part plus correction, rounded once) after every
    // dense write of this row: the barrier orders the two writes of an index.
    __syncthreads();
    for (int64_t c = threadIdx.x; c < a_.k; c += kThreads) {
      const double v = slot_value(c);
      const int64_t j = slot_index(a_, row_ * a_.k + c);
      if (is_padding(v) || j < 0 || j >= V) continue;
      const double corr = sparse_slot_correction(r, sparse_slot_terms(r, v, slot_lq(c)));
      g_[j] = from_acc<X>(acc_t(double(dense(j, to_acc(s_[j]))) + cs * corr));
    }
  }

  const SparseKernelArgs& a_;
  const int64_t row_;
  const uint32_t* support_;
  double* scratch_;
  const double inv_t_;
  const X* s_;
  X* g_;
  const int64_t y_;
  const bool hard_row_, soft_row_;
  double shift_ = 0, log_sum_b_ = 0, max1_ = 0, log_sum1_ = 0, sum_s_ = 0, lq_tail_ = 0;
};

template <class X>
__global__ void __launch_bounds__(kThreads) sparse_kernel(SparseKernelArgs a) {
  __shared__ double scratch[kScratchDoubles];
  uint32_t* support = a.support + int64_t(blockIdx.x) * sparse_support_words(a.vocab);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    mark_support(a, row, support, true);
    __syncthreads();
    SparseRowPass<X>(a, row, support, scratch).run();
    __syncthreads();  // the bitmap is read, and the slot corrections are written, before it is cleared
    mark_support(a, row, support, false);
    __syncthreads();  // cleared before the next row marks its own
  }
}

using SparseKernel = void (*)(SparseKernelArgs);

SparseKernel kernel_for(DType dtype) {
  return visit_logit_type(dtype, [](auto x) -> SparseKernel { return sparse_kernel<typename decltype(x)::type>; });
}

}  // namespace

int64_t sparse_grid_blocks(DType dtype, int64_t rows, int sm_count) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_for(dtype), kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // the launch reports the cause (e.g. no kernel image for this GPU)
    per_sm = 1;
  }
  const int64_t resident = int64_t(per_sm > 0 ? per_sm : 1) * (sm_count > 0 ? sm_count : 1);
  return rows < resident ? rows : resident;
}

void launch_sparse_kernel(const SparseKernelArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.blocks <= 0) return;
  kernel_for(a.dtype)<<<unsigned(a.blocks), kThreads, 0, stream>>>(a);
}

}  // namespace fastkd::cuda
