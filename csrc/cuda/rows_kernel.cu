// The CUDA kernel of fastkd::distill_rows: any divergence (csrc/divergence_row.h), per-row terms, the
// gradients weighted by the caller's device weights. One block per row, three passes over the row
// (the later ones mostly hit L2): softmax statistics, the divergence's three sums, the gradients.
// Deterministic: fixed reduction trees, no atomics. The weights, the fp16 pre-scale and every
// normaliser stay on the device: no host synchronisation.
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/device_math.cuh"
#include "cuda/rows_launch.h"
#include "divergence_row.h"

namespace fastkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The Math of divergence_row.h on scalars, with the accurate library functions (the divergences'
// mixtures need log1p-grade accuracy near d = 0).
template <class acc_t>
struct RowMath {
  static __device__ __forceinline__ acc_t exp(acc_t x) { return ::exp(x); }
  static __device__ __forceinline__ acc_t expm1(acc_t x) { return ::expm1(x); }
  static __device__ __forceinline__ acc_t log(acc_t x) { return ::log(x); }
  static __device__ __forceinline__ acc_t abs(acc_t x) { return ::fabs(x); }
  static __device__ __forceinline__ acc_t clamp(acc_t x, acc_t lo, acc_t hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
  static __device__ __forceinline__ acc_t where_zero(acc_t p, acc_t x) { return p == acc_t(0) ? acc_t(0) : x; }
  static __device__ __forceinline__ acc_t where_lt(acc_t x, acc_t y, acc_t a, acc_t b) { return x < y ? a : b; }
  static __device__ __forceinline__ acc_t sign(acc_t x) { return acc_t(x > acc_t(0)) - acc_t(x < acc_t(0)); }
};

// Online (max, sum of exp((x - max) * k)) of one stream; NaN propagates through the sum.
struct Online {
  double m = -INFINITY;
  double s = 0;

  __device__ void add(double x, double k) {
    if (x != x) {
      s = NAN;
    } else if (x > m) {
      s = (m == -INFINITY ? 0.0 : s * ::exp((m - x) * k)) + 1.0;
      m = x;
    } else if (x != -INFINITY) {
      s += ::exp((x - m) * k);
    }
  }
  __device__ void merge(const Online& o, double k) {
    if (o.m == -INFINITY) {
      s += o.s;  // 0, or NaN it saw
      return;
    }
    if (o.m > m || m == -INFINITY) {
      s = (m == -INFINITY ? 0.0 : s * ::exp((m - o.m) * k)) + o.s;
      m = o.m;
    } else {
      s += o.s * ::exp((o.m - m) * k);
    }
  }
};

// Sum of one double over the block, the same tree every time; every thread gets the result.
__device__ double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

__device__ Online block_online(Online v, double k, Online* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) {
    Online other;
    other.m = __shfl_down_sync(0xffffffffu, v.m, o);
    other.s = __shfl_down_sync(0xffffffffu, v.s, o);
    v.merge(other, k);
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Online total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total.merge(scratch[w], k);
  return total;
}

// One element's p, q and divergence terms; ElementTerms plus the probabilities the gradient needs.
template <class acc_t>
struct RowElement : ElementTerms<acc_t> {
  acc_t p, q;
};

// What passes 2 and 3 need of pass 1: p = exp((t - max_t) / T - log sum_t), q likewise, and
// d = log p - log q = (t - s) / T - delta.
template <class acc_t>
struct RowFrame {
  double max_t, max_s, log_sum_t, log_sum_b, inv_t, delta;
  acc_t beta, one_minus_beta;

  template <Divergence kKind>
  __device__ RowElement<acc_t> element(double s, double t) const {
    RowElement<acc_t> e;
    e.p = acc_t(::exp((t - max_t) * inv_t - log_sum_t));
    e.q = acc_t(::exp((s - max_s) * inv_t - log_sum_b));
    const acc_t d = acc_t((t - s) * inv_t - delta);
    static_cast<ElementTerms<acc_t>&>(e) = divergence_terms<kKind, RowMath<acc_t>>(e.p, e.q, d, beta, one_minus_beta);
    return e;
  }
};

template <class X, Divergence kKind>
__global__ void __launch_bounds__(kThreads) rows_kernel(RowsKernelArgs a) {
  using acc_t = acc_of<X>;
  __shared__ double scratch[kWarps];
  __shared__ Online online_scratch[kWarps];
  const int64_t V = a.vocab;
  const double inv_t = a.inv_temperature;
  const double w_soft = a.weights[0], w_hard = a.weights[1];
  // float16 gradients: a power of two bringing the largest possible entry near 2^12 (as on the CPU).
  const double prescale =
      a.fp16_grad ? fp16_gradient_prescale(::fabs(w_soft) * inv_t * a.gradient_bound + 2.0 * ::fabs(w_hard)) : 1.0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.grad_scale = float(prescale);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const X* s = static_cast<const X*>(a.student) + row * a.student_row_stride;
    const X* t = static_cast<const X*>(a.teacher) + row * a.teacher_row_stride;
    X* gs = a.grad_student ? static_cast<X*>(a.grad_student) + row * V : nullptr;
    X* gt = a.grad_teacher ? static_cast<X*>(a.grad_teacher) + row * V : nullptr;
    const int64_t y = a.target ? a.target[row] : -1;
    const bool hard_row = a.target != nullptr && y != a.ignore_index;
    if (hard_row) CUDA_KERNEL_ASSERT(y >= 0 && y < V && "fastkd: target out of range [0, vocab)");
    const bool soft_row = a.soft_mask ? a.soft_mask[row] : (a.target == nullptr || hard_row);
    if (!soft_row && !hard_row) {
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        if (gs) gs[j] = from_acc<X>(acc_t(0));
        if (gt) gt[j] = from_acc<X>(acc_t(0));
      }
      if (threadIdx.x == 0) a.row_loss[row] = a.row_soft[row] = a.row_hard[row] = 0;
      continue;
    }

    // Pass 1: softmax statistics of t / T, s / T and s (the cross-entropy), and sum s.
    Online st, sb, s1;
    double sum_s = 0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const double sv = double(to_acc(s[j])), tv = double(to_acc(t[j]));
      st.add(tv, inv_t);
      sb.add(sv, inv_t);
      s1.add(sv, 1.0);
      sum_s += sv;
    }
    st = block_online(st, inv_t, online_scratch);
    sb = block_online(sb, inv_t, online_scratch);
    s1 = block_online(s1, 1.0, online_scratch);
    sum_s = block_sum(sum_s, scratch);
    const double log_st = ::log(st.s), log_sb = ::log(sb.s), log_s1 = ::log(s1.s);
    const double delta = (st.m - sb.m) * inv_t + (log_st - log_sb);  // lse(t/T) - lse(s/T)

    // Pass 2: the divergence's sums.
    const RowFrame<acc_t> frame{st.m, sb.m, log_st, log_sb, inv_t, delta, acc_t(a.beta), acc_t(a.one_minus_beta)};
    double f = 0, qg = 0, ph = 0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const RowElement<acc_t> e = frame.template element<kKind>(double(to_acc(s[j])), double(to_acc(t[j])));
      f += double(e.f);
      qg += double(e.qg);
      ph += double(e.ph);
    }
    const double soft = soft_row ? block_sum(f, scratch) : 0.0;
    const double qg_sum = block_sum(qg, scratch), ph_sum = block_sum(ph, scratch);
    double hard = 0;
    const double eps = a.label_smoothing;
    if (hard_row) {
      const double lse = s1.m + log_s1;
      hard = (1 - eps) * (lse - double(to_acc(s[y]))) + eps * (lse - sum_s / double(V));
    }
    if (threadIdx.x == 0) {
      a.row_soft[row] = soft;
      a.row_hard[row] = hard;
      a.row_loss[row] = w_soft * soft + w_hard * hard;
    }
    if (!gs && !gt) continue;

    // Pass 3: the gradients.
    const double cs = soft_row ? w_soft * prescale * inv_t : 0.0;
    const double ch = hard_row ? w_hard * prescale : 0.0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const double sv = double(to_acc(s[j]));
      const RowElement<acc_t> e = frame.template element<kKind>(sv, double(to_acc(t[j])));
      const acc_t p = e.p, q = e.q;
      if (gs) {
        double g = cs == 0.0 ? 0.0 : cs * (double(e.qg) - double(q) * qg_sum);
        if (ch != 0.0) {
          const double r = ::exp(sv - s1.m - log_s1);
          g += ch * (r - eps / double(V) - (j == y ? 1 - eps : 0.0));
        }
        gs[j] = from_acc<X>(acc_t(g));
      }
      if (gt) gt[j] = from_acc<X>(acc_t(cs == 0.0 ? 0.0 : cs * (double(e.ph) - double(p) * ph_sum)));
    }
  }
}

template <class X>
void launch_for(const RowsKernelArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.rows < 65535 ? a.rows : 65535;
  switch (a.divergence) {
    case Divergence::ReverseKL: rows_kernel<X, Divergence::ReverseKL><<<unsigned(blocks), kThreads, 0, stream>>>(a); break;
    case Divergence::JSD: rows_kernel<X, Divergence::JSD><<<unsigned(blocks), kThreads, 0, stream>>>(a); break;
    case Divergence::TVD: rows_kernel<X, Divergence::TVD><<<unsigned(blocks), kThreads, 0, stream>>>(a); break;
    case Divergence::SkewForwardKL:
      rows_kernel<X, Divergence::SkewForwardKL><<<unsigned(blocks), kThreads, 0, stream>>>(a);
      break;
    case Divergence::SkewReverseKL:
      rows_kernel<X, Divergence::SkewReverseKL><<<unsigned(blocks), kThreads, 0, stream>>>(a);
      break;
    default: rows_kernel<X, Divergence::ForwardKL><<<unsigned(blocks), kThreads, 0, stream>>>(a); break;
  }
}

}  // namespace

void launch_rows_kernel(const RowsKernelArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return;
  switch (a.dtype) {
    case DType::BFloat16: return launch_for<__nv_bfloat16>(a, stream);
    case DType::Half: return launch_for<__half>(a, stream);
    case DType::Double: return launch_for<double>(a, stream);
    default: return launch_for<float>(a, stream);
  }
}

}  // namespace fastkd::cuda
