// Per-row math of the distillation loss (docs/spec.md), shared by the CPU and the CUDA kernels.
//
// A row is one sample: student logits s[0..V), teacher logits t[0..V). Everything a row needs is
// gathered in one streaming pass into RowStats (online softmax: running maxima and rescaled sums,
// rebased onto new maxima chunk by chunk, so partial rows combine associatively), turned into the loss
// and a handful of gradient coefficients by finalize(), and the gradient is then written element by
// element by element_student_grad() / element_teacher_grad(). The element functions are templates over the value type, so the CPU kernel runs
// them on at::vec::Vectorized lanes and the CUDA kernel on scalars; `Math` supplies exp and select.
//
// Maxima are tracked on the raw logits (not divided by T): exponents are (x - max) / T, which keeps
// full precision at small T and large |logits|. Another divergence (reverse KL, JSD) adds its own
// statistics next to the forward-KL ones (`w`) and its own lines in finalize() and the element functions.
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
  double soft_weight = 0.5;    // weight of the soft term in a row's loss: alpha * c (times a normaliser)
  double hard_weight = 0.5;    // weight of the hard term: 1 - alpha (times a normaliser)
  double label_smoothing = 0.0;
  int64_t vocab = 0;
  bool has_soft = true;        // the KL term is computed (the teacher is read)
  bool has_hard = true;        // the cross-entropy term is computed (a target is given)
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

// Everything one row needs, in the single-pass form of docs/spec.md.
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
  out.loss = acc_t(p.soft_weight) * out.soft + acc_t(p.hard_weight) * out.hard;
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
    c.hard_coef = p.has_hard ? acc_t(p.hard_weight) * grad_scale : acc_t(0);
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
// The student gradient takes q = softmax(s/T)_j and p = softmax(t/T)_j from exps the kernel already
// holds. kPowT: the integer temperature (1, 2, 4) or 0.
// The hard term's share of one element's student gradient, hard_coef * r - uniform, with
// r = exp(s - max) / sum_1 taken from q's exponential when T is an integer (kPowT 1, 2, 4).
template <class Math, int kPowT, class V, class acc_t>
FASTKD_HD V element_hard_grad(V s, V q, const RowCoeffs<acc_t>& c) {
  const V r = (kPowT == 1)   ? q
              : (kPowT != 0) ? integer_power<kPowT>(q * V(c.sum_b)) * V(c.inv_sum_1)
                             : Math::exp(s - V(c.max_s)) * V(c.inv_sum_1);
  return V(c.hard_coef) * r - V(c.uniform);
}

template <class Math, bool kHard, int kPowT, class V, class acc_t>
FASTKD_HD V element_student_grad(V s, V q, V p, const RowCoeffs<acc_t>& c) {
  V g = V(c.soft_coef) * (q - p);
  if constexpr (kHard) g = g + element_hard_grad<Math, kPowT>(s, q, c);
  return g;
}

// Teacher gradient from p. p == 0 (a -inf teacher logit)
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
  loss.loss = acc_t(p.soft_weight) * loss.soft + acc_t(p.hard_weight) * loss.hard;
}

// ---------------------------------------------------------------- exp2 form
// For backends with a fast 2^x (CUDA's ex2). Every exponent is one multiply-add in a per-row frame:
// u = t k + c_t, v = s k + c_b, with k = log2(e) / T and c = -round(max k), so 2^u is
// e^((t - max_t) / T) times 2^r_t, the same factor for the whole stream (r = max k + c, the
// rounding error of max k, tiny but not negligible at |logits| ~ 1e4). Normalized values (p, q,
// r) do not see r, and neither does KL written in the frame:
//     KL = ln2 * sum 2^u (u - v) / sum 2^u - ln sum 2^u + ln sum 2^v
// which also keeps (t - s) / T and (max_t - max_s) / T, each large at large logits, from cancelling
// against each other in fp32. Only the cross-entropy needs a true sum (lse(s) = max_s + ln S_1).
template <class acc_t>
struct Exp2Shift {
  acc_t k = 0;  // log2(e) / T, or log2(e) for the T = 1 stream
  acc_t c = 0;  // -round(max * k); 0 while max is -inf (every term is then 2^-inf = 0)
  acc_t r = 0;  // the frame's sums are 2^r times the true ones
};

template <class acc_t>
FASTKD_HD Exp2Shift<acc_t> exp2_shift(acc_t max, acc_t k) {
  Exp2Shift<acc_t> sh;
  sh.k = k;
  if (max == neg_inf<acc_t>()) return sh;
  const acc_t mk = max * k;
  sh.c = -mk;
  sh.r = std::fma(max, k, -mk);  // the exact rounding error of max * k
  return sh;
}

// The frame of a stream's square (T == 2: e^(s - max) is e^((s - max) / 2) squared).
template <class acc_t>
FASTKD_HD Exp2Shift<acc_t> exp2_shift_squared(const Exp2Shift<acc_t>& sh) {
  Exp2Shift<acc_t> sq;
  sq.k = sh.k + sh.k;
  sq.c = sh.c + sh.c;
  sq.r = sh.r + sh.r;
  return sq;
}

// A row's frames: t (teacher at T), b (student at T), one (student at T = 1). kTMode 1, 2 and 4
// (LossParams::integer_temperature) derive the T = 1 stream from the b-stream, 2^v raised to the
// power T, instead of a third exponential.
template <class acc_t>
struct Exp2Shifts {
  Exp2Shift<acc_t> t, b, one;
};

template <int kTMode, class acc_t>
FASTKD_HD Exp2Shifts<acc_t> exp2_shifts(acc_t max_t, acc_t max_s, const LossParams& p) {
  const acc_t log2e = acc_t(1.4426950408889634);
  const acc_t k = acc_t(p.inv_temperature * 1.4426950408889634);
  Exp2Shifts<acc_t> sh;
  sh.t = exp2_shift(max_t, k);
  sh.b = exp2_shift(max_s, k);
  if constexpr (kTMode == 1) {
    sh.one = sh.b;
  } else if constexpr (kTMode == 2) {
    sh.one = exp2_shift_squared(sh.b);
  } else if constexpr (kTMode == 4) {
    sh.one = exp2_shift_squared(exp2_shift_squared(sh.b));
  } else {
    sh.one = exp2_shift(max_s, log2e);
  }
  return sh;
}

// Sums of a row in its frames: sum_t = sum 2^u, w = sum 2^u (u - v), sum_b = sum 2^v,
// sum_1 = sum 2^(s k_1 + c_1), sum_s = sum s (raw), and max_d = max (u - v) (RowStats::max_d).
template <class acc_t>
struct Exp2Sums {
  acc_t sum_t = 0, w = 0, sum_b = 0, sum_1 = 0, sum_s = 0;
  acc_t max_d = neg_inf<acc_t>();

  FASTKD_HD void add(const Exp2Sums& o) {
    sum_t += o.sum_t;
    w += o.w;
    sum_b += o.sum_b;
    sum_1 += o.sum_1;
    sum_s += o.sum_s;
    max_d = std::fmax(max_d, o.max_d);
  }

  // The five sums as an array, for block and cluster reductions, and back.
  FASTKD_HD void to_array(acc_t (&out)[5]) const {
    out[0] = sum_t;
    out[1] = w;
    out[2] = sum_b;
    out[3] = sum_1;
    out[4] = sum_s;
  }
  FASTKD_HD static Exp2Sums from_array(const acc_t (&in)[5], acc_t max_d_value) {
    Exp2Sums x;
    x.sum_t = in[0];
    x.w = in[1];
    x.sum_b = in[2];
    x.sum_1 = in[3];
    x.sum_s = in[4];
    x.max_d = max_d_value;
    return x;
  }
};

// e1 = 2^(s k_1 + c_1) from 2^v when T is 1, 2 or 4 (kTMode), else its own exponential.
template <class Math, int kTMode, class acc_t>
FASTKD_HD acc_t exp2_unit_stream(acc_t s, acc_t eb, const Exp2Shifts<acc_t>& sh) {
  if constexpr (kTMode == 1) {
    return eb;
  } else if constexpr (kTMode == 2) {
    return eb * eb;
  } else if constexpr (kTMode == 4) {
    const acc_t e2 = eb * eb;
    return e2 * e2;
  } else {
    return Math::exp2(std::fma(s, sh.one.k, sh.one.c));
  }
}

// u - v for the w sum and the teacher gradient, with -inf - x and NaN (both logits -inf) raised to
// the lowest finite value: a -inf teacher logit (2^u = 0) then adds exactly 0 where 0 * inf would be
// NaN, while a -inf student logit under p > 0 still gives +inf. A NaN logit still gives NaN, through
// 2^u or the sums.
template <class acc_t>
FASTKD_HD acc_t exp2_frame_diff(acc_t u, acc_t v) {
  return std::fmax(u - v, -std::numeric_limits<acc_t>::max());
}

// One element's contribution. Math provides exp2.
template <class Math, bool kSoft, bool kHard, int kTMode, class acc_t>
FASTKD_HD void exp2_accumulate(Exp2Sums<acc_t>& x, acc_t s, acc_t t, const Exp2Shifts<acc_t>& sh) {
  acc_t v = 0, eb = 0;
  if constexpr (kSoft || (kHard && kTMode != 0)) {
    v = std::fma(s, sh.b.k, sh.b.c);
    eb = Math::exp2(v);
  }
  if constexpr (kSoft) {
    const acc_t u = std::fma(t, sh.t.k, sh.t.c);
    const acc_t et = Math::exp2(u);
    const acc_t d = exp2_frame_diff(u, v);
    x.sum_t += et;
    // At small T, 2^u underflows to 0 although p > 0: a -inf student logit under a finite teacher
    // one must still make KL +inf (0 * inf would be NaN). A NaN already in w stays NaN.
    const bool student_gone = d == std::numeric_limits<acc_t>::infinity() && u > neg_inf<acc_t>();
    x.w = student_gone ? x.w + d : std::fma(et, d, x.w);
    x.sum_b += eb;
    x.max_d = std::fmax(x.max_d, d);
  }
  if constexpr (kHard) {
    x.sum_1 += exp2_unit_stream<Math, kTMode>(s, eb, sh);
    x.sum_s += s;
  }
}

// Moves sums from frames `from` (of maxima from_t, from_s) to frames `to` (online gathering, and
// merging partial rows gathered in different frames). A stream whose maximum is still -inf has seen
// only -inf or NaN logits (the maxima drop NaN), so its sums are exactly 0 or NaN: they are left as
// they are, which keeps an empty stream 0 and a NaN one NaN (no factor, as 2^(c - 0) may be inf).
template <class Math, class acc_t>
FASTKD_HD void exp2_move(Exp2Sums<acc_t>& x, acc_t from_t, acc_t from_s, const Exp2Shifts<acc_t>& from,
                         const Exp2Shifts<acc_t>& to) {
  const acc_t ninf = neg_inf<acc_t>();
  const acc_t dt = to.t.c - from.t.c, db = to.b.c - from.b.c;
  if (from_t == ninf) {
    x.max_d = ninf;
  } else if (dt != acc_t(0) || db != acc_t(0)) {
    const acc_t ft = dt == acc_t(0) ? acc_t(1) : Math::exp2(dt);
    const acc_t w = x.w + x.sum_t * (dt - db);  // each u - v grows by dt - db
    // +inf (a -inf student logit under p > 0) stays +inf where ft underflows to 0.
    x.w = w == std::numeric_limits<acc_t>::infinity() ? w : ft * w;
    x.sum_t *= ft;
    x.max_d += dt - db;
  }
  if (from_s != ninf) {
    if (db != acc_t(0)) x.sum_b *= Math::exp2(db);
    const acc_t d1 = to.one.c - from.one.c;
    if (d1 != acc_t(0)) x.sum_1 *= Math::exp2(d1);
  }
}

// RowStats for finalize() from a row's frame sums (any accumulation type in, wide_t out: the CUDA
// kernels finalize fp32 sums in fp64, as the CPU kernel does). Both maxima are set to max_s, so
// finalize's (max_t - max_s) / T is 0 and its soft term is the frame form of KL above; sum_1 alone
// is brought back to its true value for lse(s).
template <class wide_t, class acc_t>
FASTKD_HD RowStats<wide_t> exp2_row_stats(const Exp2Sums<acc_t>& x, acc_t max_s, const Exp2Shifts<acc_t>& sh) {
  RowStats<wide_t> st;
  st.max_t = wide_t(max_s);
  st.max_s = wide_t(max_s);
  st.sum_t = wide_t(x.sum_t);
  st.w = wide_t(x.w) * wide_t(0.6931471805599453);  // ln 2: frame units to natural ones
  st.sum_b = wide_t(x.sum_b);
  st.sum_1 = wide_t(x.sum_1) * std::exp2(-wide_t(sh.one.r));
  st.sum_s = wide_t(x.sum_s);
  st.max_d = wide_t(x.max_d) * wide_t(0.6931471805599453);
  return st;
}

// Gradient coefficients in the frame: p_scale, q_scale and r_scale turn 2^u, 2^v and 2^(s k_1 + c_1)
// straight into soft_coef * p, soft_coef * q and hard_coef * r.
template <class acc_t>
struct Exp2Coeffs {
  Exp2Shifts<acc_t> sh;
  acc_t p_scale = 0, q_scale = 0, r_scale = 0;
  acc_t uniform = 0, target_coef = 0;
  acc_t teacher_shift = 0;  // mu = E_p[(u - v) ln 2]: log p - log q - soft = (u - v) ln 2 - mu
  acc_t inv_sum_b = 0;      // q = 2^v * inv_sum_b, for the KL refinement
  bool refine = false;      // RowCoeffs::refine: this row's KL comes from exp2_refinement_term sums
};

// From the frame sums and finalize()'s coefficients of exp2_row_stats()'s RowStats.
template <class acc_t, class wide_t>
FASTKD_HD Exp2Coeffs<acc_t> exp2_coeffs(const Exp2Sums<acc_t>& x, const Exp2Shifts<acc_t>& sh,
                                        const RowCoeffs<wide_t>& c, const LossParams& p) {
  Exp2Coeffs<acc_t> e;
  e.sh = sh;
  if (p.has_soft) {
    e.p_scale = acc_t(c.soft_coef / wide_t(x.sum_t));
    e.q_scale = acc_t(c.soft_coef / wide_t(x.sum_b));
  }
  if (p.has_hard) e.r_scale = acc_t(c.hard_coef / wide_t(x.sum_1));
  e.uniform = acc_t(c.uniform);
  e.target_coef = acc_t(c.target_coef);
  e.teacher_shift = acc_t(c.teacher_shift);
  e.inv_sum_b = acc_t(wide_t(1) / wide_t(x.sum_b));
  e.refine = c.refine;
  return e;
}

// Gradients of one element in the frame (before the target correction), as element_student_grad
// and element_teacher_grad: gs = soft_coef (q - p) + hard_coef r - uniform, and when kTeacher
// gt = soft_coef p (log p - log q - soft).
template <class Math, bool kSoft, bool kHard, int kTMode, bool kTeacher, class acc_t>
FASTKD_HD void exp2_element_grads(acc_t s, acc_t t, const Exp2Coeffs<acc_t>& c, acc_t& gs, acc_t& gt) {
  acc_t g = 0, v = 0, eb = 0;
  if constexpr (kSoft || (kHard && kTMode != 0)) {
    v = std::fma(s, c.sh.b.k, c.sh.b.c);
    eb = Math::exp2(v);
  }
  if constexpr (kSoft) {
    const acc_t u = std::fma(t, c.sh.t.k, c.sh.t.c);
    const acc_t pw = Math::exp2(u) * c.p_scale;  // soft_coef * p
    g = std::fma(eb, c.q_scale, -pw);
    // p == 0 (2^u underflowed or a -inf teacher logit) contributes exactly 0, as on the CPU.
    if constexpr (kTeacher) {
      gt = pw == acc_t(0) ? acc_t(0)
                          : pw * std::fma(exp2_frame_diff(u, v), acc_t(0.6931471805599453), -c.teacher_shift);
    }
  }
  if constexpr (kHard) g = std::fma(exp2_unit_stream<Math, kTMode>(s, eb, c.sh), c.r_scale, g) - c.uniform;
  gs = g;
}

// One element's term of the KL refinement (element_kl_refinement in the frame): q expm1(d - mu).
// Summed over the row, then refine_soft(). Math provides expm1.
template <class Math, class acc_t>
FASTKD_HD acc_t exp2_refinement_term(acc_t s, acc_t t, const Exp2Coeffs<acc_t>& c) {
  const acc_t v = std::fma(s, c.sh.b.k, c.sh.b.c);
  const acc_t u = std::fma(t, c.sh.t.k, c.sh.t.c);
  const acc_t q = Math::exp2(v) * c.inv_sum_b;
  return q * Math::expm1(std::fma(exp2_frame_diff(u, v), acc_t(0.6931471805599453), -c.teacher_shift));
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
