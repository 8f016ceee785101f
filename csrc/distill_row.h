// Per-row math of the distillation loss (../shared/SPEC.md), shared by the CPU and the CUDA kernels.
//
// A row is one sample: student logits s[0..V), teacher logits t[0..V). Everything a row needs is
// gathered in one streaming pass into RowStats (online softmax: running maxima and rescaled sums,
// mergeable across vocabulary chunks, threads or ranks), turned into the loss and a handful of
// gradient coefficients by finalize(), and the gradient is then written element by element by
// element_grads(). The element functions are templates over the value type, so the CPU kernel runs
// them on at::vec::Vectorized lanes and the CUDA kernel on scalars; `Math` supplies exp and select.
//
// Maxima are tracked on the raw logits (not divided by T): exponents are (x - max) / T, which keeps
// full precision at small T and large |logits|. Another divergence (reverse KL, JSD) adds its own
// statistics next to the forward-KL ones (`w`) and its own lines in finalize() and element_grads().
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

// Each CPU ISA build (and the CUDA build) gets its own copy of these inline functions, so the linker
// never picks an AVX2 copy for the portable path.
#ifndef FASTKD_ISA
#define FASTKD_ISA generic
#endif

namespace fastkd {

enum class Reduction : int { None = 0, Mean = 1, Sum = 2, BatchMean = 3 };

// The scalar knobs of the loss, fixed for a whole call (plain data: shared by every ISA build).
struct LossParams {
  double inv_temperature = 1.0;
  double alpha = 0.5;          // weight of the soft (distillation) term
  double soft_weight = 0.5;    // alpha * (T^2 if scale_by_temperature_squared else 1)
  double label_smoothing = 0.0;
  int64_t vocab = 0;
  bool has_soft = true;        // the KL term is computed (the teacher is read)
  bool has_hard = true;        // the cross-entropy term is computed (a target is given)
  bool unit_temperature = false;  // T == 1: softmax(s / T) is softmax(s), one exp stream less
  // T when it is 1, 2 or 4, else 0: exp(s - max) = exp((s - max) / T)^T, a multiply or two instead
  // of a second exp stream.
  int integer_temperature = 0;
  // Relative rounding of one element's arithmetic (fp32 unless the inputs are float64): decides
  // whether the single-pass KL is accurate enough or the refinement is needed.
  double element_epsilon = 6e-8;
};

inline namespace FASTKD_ISA {

template <class acc_t>
FASTKD_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// max that propagates NaN from either side (std::max drops a NaN in its second argument).
template <class acc_t>
FASTKD_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// Factor that moves a sum of exp((x - old_max) * scale) onto new_max. A sum that is still empty
// (old_max == -inf) is 0 whatever the factor; returning 0 avoids exp(-inf + inf) = NaN.
template <class acc_t>
FASTKD_HD acc_t rescale_factor(acc_t old_max, acc_t new_max, acc_t scale) {
  if (old_max == neg_inf<acc_t>()) return acc_t(0);
  return std::exp((old_max - new_max) * scale);
}

// Everything one row needs, in the single-pass form of SPEC.
template <class acc_t>
struct RowStats {
  acc_t max_t = neg_inf<acc_t>();  // max_j t_j (raw)
  acc_t sum_t = 0;                 // sum_j exp((t_j - max_t) / T)
  acc_t w = 0;                     // sum_j exp((t_j - max_t) / T) * (t_j - s_j) / T
  acc_t max_s = neg_inf<acc_t>();  // max_j s_j (raw)
  acc_t sum_b = 0;                 // sum_j exp((s_j - max_s) / T)
  acc_t sum_1 = 0;                 // sum_j exp(s_j - max_s)
  acc_t sum_s = 0;                 // sum_j s_j (label smoothing)
  acc_t max_d = neg_inf<acc_t>();  // max_j (t_j - s_j) / T: decides whether the KL refinement is safe

  // Moves the running sums onto new maxima (raw units) before a chunk relative to them is added.
  FASTKD_HD void rebase(acc_t new_max_t, acc_t new_max_s, acc_t inv_t) {
    const acc_t ft = rescale_factor(max_t, new_max_t, inv_t);
    sum_t *= ft;
    w *= ft;
    sum_b *= rescale_factor(max_s, new_max_s, inv_t);
    sum_1 *= rescale_factor(max_s, new_max_s, acc_t(1));
    max_t = new_max_t;
    max_s = new_max_s;
  }

  // Associative merge of two partial rows (vocabulary chunks, threads, ranks).
  FASTKD_HD void merge(const RowStats& o, acc_t inv_t) {
    RowStats other = o;
    const acc_t mt = nan_max(max_t, o.max_t);
    const acc_t ms = nan_max(max_s, o.max_s);
    rebase(mt, ms, inv_t);
    other.rebase(mt, ms, inv_t);
    sum_t += other.sum_t;
    w += other.w;
    sum_b += other.sum_b;
    sum_1 += other.sum_1;
    sum_s += other.sum_s;
    max_d = nan_max(max_d, other.max_d);
  }

  // Adds one element (scalar online update; the vector paths add whole chunks instead).
  FASTKD_HD void push(acc_t s, acc_t t, const LossParams& p) {
    const acc_t inv_t = acc_t(p.inv_temperature);
    rebase(p.has_soft ? nan_max(max_t, t) : max_t, nan_max(max_s, s), inv_t);
    if (p.has_soft && max_t != neg_inf<acc_t>()) {
      const acc_t et = std::exp((t - max_t) * inv_t);
      sum_t += et;
      if (et > acc_t(0)) w += et * ((t - s) * inv_t);
      max_d = nan_max(max_d, (t - s) * inv_t);
    }
    if (max_s != neg_inf<acc_t>()) {
      const acc_t eb = std::exp((s - max_s) * inv_t);
      sum_b += eb;
      sum_1 += p.unit_temperature ? eb : std::exp(s - max_s);
    }
    sum_s += s;
  }
};

// What the gradient pass needs of a finished row. All gradient coefficients already include the
// reduction's scale (1 / count for "mean", ...), so the kernels write the final gradient directly.
template <class acc_t>
struct RowCoeffs {
  acc_t max_t, max_s, inv_t;
  acc_t inv_sum_t, inv_sum_b, inv_sum_1;
  acc_t sum_b;           // undoes q's normalisation for integer_power()
  acc_t soft_coef;       // alpha * c / T * scale: multiplies (q - p) and the teacher gradient
  acc_t hard_coef;       // (1 - alpha) * scale: multiplies r
  acc_t uniform;         // hard_coef * eps / V: the label-smoothing share of every class
  acc_t target_coef;     // hard_coef * (1 - eps): subtracted at the target class
  acc_t teacher_shift;   // E_p[(t - s) / T] = log p - log q - soft, exactly (see finalize)
  bool refine;           // the KL refinement pass is safe (no overflow) for this row
};

template <class acc_t>
struct RowLoss {
  acc_t soft;  // KL(p || q)
  acc_t hard;  // label-smoothed cross-entropy
  acc_t loss;  // alpha * c * soft + (1 - alpha) * hard
};

// Turns the statistics of a whole row into its loss terms and gradient coefficients.
// `s_target` is the student logit at the target class (unused when the hard term is off).
template <class acc_t>
FASTKD_HD RowLoss<acc_t> finalize(const RowStats<acc_t>& st, acc_t s_target, const LossParams& p,
                                  acc_t grad_scale, RowCoeffs<acc_t>* coeffs) {
  const acc_t inv_t = acc_t(p.inv_temperature);
  const acc_t log_sum_t = std::log(st.sum_t);
  const acc_t log_sum_b = std::log(st.sum_b);
  const acc_t log_sum_1 = std::log(st.sum_1);
  RowLoss<acc_t> out{acc_t(0), acc_t(0), acc_t(0)};
  // mu = E_p[d], d = a - b = (t - s) / T. KL = mu - (lse_a - lse_b), the maxima split out of both
  // lse. This difference of logs loses ~1e-7 * |lse| absolutely, which T^2 magnifies at large T;
  // refine_soft() recovers it from the second pass.
  const acc_t mu = st.w / st.sum_t;
  if (p.has_soft) {
    out.soft = mu - (st.max_t - st.max_s) * inv_t - log_sum_t + log_sum_b;
  }
  if (p.has_hard) {
    const acc_t eps = acc_t(p.label_smoothing);
    const acc_t lse_minus_max = log_sum_1;  // lse(s) - max_s
    out.hard = (acc_t(1) - eps) * (lse_minus_max + (st.max_s - s_target));
    if (eps > acc_t(0)) {
      out.hard += eps * (lse_minus_max + st.max_s - st.sum_s / acc_t(p.vocab));
    }
  }
  out.loss = acc_t(p.soft_weight) * out.soft + acc_t(1.0 - p.alpha) * out.hard;
  if (coeffs != nullptr) {
    RowCoeffs<acc_t>& c = *coeffs;
    c.max_t = st.max_t;
    c.max_s = st.max_s;
    c.inv_t = inv_t;
    c.inv_sum_t = acc_t(1) / st.sum_t;
    c.inv_sum_b = acc_t(1) / st.sum_b;
    c.inv_sum_1 = acc_t(1) / st.sum_1;
    c.sum_b = st.sum_b;
    c.soft_coef = p.has_soft ? acc_t(p.soft_weight) * inv_t * grad_scale : acc_t(0);
    c.hard_coef = p.has_hard ? acc_t(1.0 - p.alpha) * grad_scale : acc_t(0);
    c.uniform = c.hard_coef * acc_t(p.label_smoothing) / acc_t(p.vocab);
    c.target_coef = c.hard_coef * (acc_t(1) - acc_t(p.label_smoothing));
    // log p_j - log q_j = d_j - (lse_a - lse_b) = d_j - mu + KL, so log p - log q - KL = d_j - mu.
    c.teacher_shift = mu;
    // The single-pass KL is off by ~eps * (2 + |mu|) (the logs of the sums are good to eps). When
    // the soft weight (T^2) magnifies that past 1e-6 of the row's loss, refine. The refinement's
    // products q_j * exp(d_j - mu) = p_j * exp(-KL) <= 1 need exp(d_j - mu) finite and q_j not lost
    // to underflow where it matters: d_j - mu <= 20 guarantees both.
    const acc_t single_pass_error = acc_t(2 * p.element_epsilon) * (acc_t(2) + std::fabs(mu)) *
                                    acc_t(p.soft_weight > 1.0 ? p.soft_weight : 1.0);
    c.refine = p.has_soft && (st.max_d - mu) <= acc_t(20) &&
               single_pass_error > acc_t(1e-6) * std::fabs(out.loss);
  }
  return out;
}

// exp(x)^k for the integer temperatures k = 1, 2, 4 (kPowT); kPowT == 0 means "not integer".
template <int kPowT, class V>
FASTKD_HD V integer_power(V x) {
  if constexpr (kPowT == 2) return x * x;
  if constexpr (kPowT == 4) {
    const V x2 = x * x;
    return x2 * x2;
  }
  return x;
}

// Gradients of one element (or one vector of elements) of a finished row, before the target
// class correction (grad_s[y] -= target_coef), which the kernels apply once per row.
//   d/ds = soft_coef * (q - p) + hard_coef * r - uniform
//   d/dt = soft_coef * p * (log p - log q - soft)
// V is a scalar or a vector type; Math provides exp(V) and zero_where_zero(V p, V x) (x, or 0 where p == 0).
// kPowT: the integer temperature (1, 2, 4) or 0 (true / false read as 1 / 0).
template <class Math, bool kSoft, bool kHard, int kPowT, class V, class acc_t>
FASTKD_HD V element_student_grad(V s, V t, const RowCoeffs<acc_t>& c, V* p_out, V* q_out = nullptr) {
  const V inv_t(c.inv_t);
  V q(acc_t(0));
  if constexpr (kSoft || kPowT != 0) q = Math::exp((s - V(c.max_s)) * inv_t) * V(c.inv_sum_b);
  V g(acc_t(0));
  if constexpr (kSoft) {
    const V p = Math::exp((t - V(c.max_t)) * inv_t) * V(c.inv_sum_t);
    g = V(c.soft_coef) * (q - p);
    if (p_out != nullptr) *p_out = p;
    if (q_out != nullptr) *q_out = q;
  }
  if constexpr (kHard) {
    // exp(s - max) / sum_1, from q's exponential when T is an integer.
    const V r = (kPowT == 1)   ? q
                : (kPowT != 0) ? integer_power<kPowT>(q * V(c.sum_b)) * V(c.inv_sum_1)
                               : Math::exp(s - V(c.max_s)) * V(c.inv_sum_1);
    g = g + V(c.hard_coef) * r - V(c.uniform);
  }
  return g;
}

// Teacher gradient from the p that element_student_grad computed. p == 0 (a -inf teacher logit)
// contributes exactly 0 instead of 0 * -inf; a NaN p stays NaN.
template <class Math, class V, class acc_t>
FASTKD_HD V element_teacher_grad(V s, V t, V p, const RowCoeffs<acc_t>& c) {
  const V log_ratio_minus_soft = (t - s) * V(c.inv_t) - V(c.teacher_shift);
  return Math::zero_where_zero(p, V(c.soft_coef) * p * log_ratio_minus_soft);
}

// The KL refinement: KL = mu - (lse_a - lse_b) and lse_a - lse_b = mu + log E_q[exp(d - mu)], so
//   KL = -log1p(R),  R = sum_j q_j * expm1(d_j - mu).
// Every term is computed from the difference d_j - mu directly, with no cancellation between large
// logs: exact to fp32 rounding even at T = 100 or when teacher and student nearly agree.
// Math provides expm1(V). Summed by the kernel over the row, then refine_soft().
template <class Math, class V, class acc_t>
FASTKD_HD V element_kl_refinement(V s, V t, V q, const RowCoeffs<acc_t>& c) {
  return q * Math::expm1((t - s) * V(c.inv_t) - V(c.teacher_shift));
}

// The refined KL replaces the single-pass one where the latter's cancellation matters, KL < ln 2
// (1 + R > 1/2); above that the single-pass form is already accurate and R, a sum that nearly
// cancels to -1, is the weaker one.
template <class acc_t>
FASTKD_HD void refine_soft(RowLoss<acc_t>& loss, acc_t refinement_sum, const LossParams& p) {
  if (!(refinement_sum > acc_t(-0.5))) return;
  loss.soft = -std::log1p(refinement_sum);
  loss.loss = acc_t(p.soft_weight) * loss.soft + acc_t(1.0 - p.alpha) * loss.hard;
}

// Scale of the reduction applied to every row's gradient (and to the summed loss).
FASTKD_HD double reduction_scale(Reduction r, int64_t unmasked_rows, int64_t batch_size) {
  switch (r) {
    case Reduction::Mean:
      return 1.0 / double(unmasked_rows > 0 ? unmasked_rows : 1);
    case Reduction::BatchMean:
      return 1.0 / double(batch_size > 0 ? batch_size : 1);
    default:
      return 1.0;
  }
}

}  // namespace FASTKD_ISA
}  // namespace fastkd
