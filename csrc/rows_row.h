// The per-thread and per-row steps of the CUDA kernel of fastkd::distill_rows (csrc/cuda/rows_kernel.cu):
// any divergence of divergence_row.h, soft_mask, label smoothing, the float16 gradient pre-scale. Host
// and device code, so the CPU suite runs exactly what the GPU runs (tests/rows_row_check.cpp).
//
// A row is read three times by a block of threads, thread i taking elements i, i + step, ...:
//   1. RowShare: the fp64 log-sum-exps of t / T, s / T and s (ExpSum: element exps in acc_t), sum s;
//      the threads' shares merge into the row's, and row_frame() turns it into the element frame.
//   2. DivergenceShare: the row sums of the divergence's f, qg, ph, and the largest |qg|, |ph|
//      (the fp16 pre-scale's bounds), summed in acc_t and folded into fp64 every kFlush elements.
//   3. The gradients, element by element (student_grad / teacher_grad).
// Element math is in acc_t (float unless the logits are float64), as in the CPU kernel; row
// statistics and sums are fp64.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "divergence_row.h"
#include "log_sum_exp.h"

namespace fastkd {
inline namespace FASTKD_ISA {

// Pass 1 of one thread (or, merged, of the row). Only doubles: the block reductions shuffle it as such.
struct RowShare {
  LogSumExp<double> t;    // of t at k = 1 / T
  LogSumExp<double> b;    // of s at k = 1 / T
  LogSumExp<double> one;  // of s at k = 1 (the cross-entropy)
  double sum_s = 0;

  FASTKD_HD void merge(const RowShare& o, double inv_t) {
    t.merge(o.t, inv_t);
    b.merge(o.b, inv_t);
    one.merge(o.one, 1.0);
    sum_s += o.sum_s;
  }
};

// Thread `first`'s share of pass 1 over elements first, first + step, ... < vocab. s(j) and t(j) load
// one logit as acc_t. The cross-entropy's statistics are gathered only for a row with a target.
template <class acc_t, class Math, class Load, class LoadT>
FASTKD_HD RowShare gather_row_share(const Load& s, const LoadT& t, int64_t first, int64_t step, int64_t vocab,
                                    acc_t inv_t, bool hard) {
  ExpSum<acc_t, Math> et, eb, e1;
  FlushedSum<acc_t> sum_s;
  for (int64_t j = first; j < vocab; j += step) {
    const acc_t sv = s(j);
    et.add(t(j), inv_t);
    eb.add(sv, inv_t);
    if (hard) {
      e1.add(sv, acc_t(1));
      sum_s.add(sv);
    }
  }
  RowShare r;
  r.t = et.total();
  r.b = eb.total();
  r.one = e1.total();
  r.sum_s = sum_s.total();
  return r;
}

// What passes 2 and 3 need of pass 1, narrowed to acc_t: p = exp((t - max_t) / T) / sum_t,
// q = exp((s - max_s) / T) / sum_b, the softmax at 1 r = exp(s - max_s) / sum_1, and
// d = log p - log q = (t - s) / T - delta, delta = lse(t / T) - lse(s / T) (as in the CPU kernel).
template <class acc_t>
struct RowFrame {
  acc_t max_t, max_s, inv_sum_t, inv_sum_b, inv_sum_1, inv_t, delta, beta, one_minus_beta;
};

template <class acc_t>
FASTKD_HD RowFrame<acc_t> row_frame(const RowShare& r, double inv_t, const DivergenceParams& d) {
  RowFrame<acc_t> f;
  // A row whose maximum is -inf (every logit -inf) shifts by 0: its exps are 0 and its sums NaN-free
  // only where the softmax is defined, as in torch.
  const double max_t = r.t.m == -std::numeric_limits<double>::infinity() ? 0.0 : r.t.m;
  const double max_s = r.b.m == -std::numeric_limits<double>::infinity() ? 0.0 : r.b.m;
  f.max_t = acc_t(max_t);
  f.max_s = acc_t(max_s);
  f.inv_sum_t = acc_t(1.0 / r.t.s);
  f.inv_sum_b = acc_t(1.0 / r.b.s);
  f.inv_sum_1 = acc_t(1.0 / r.one.s);
  f.inv_t = acc_t(inv_t);
  // The maxima split out, so that near-equal rows keep their low bits.
  f.delta = acc_t((max_t - max_s) * inv_t + (std::log(r.t.s) - std::log(r.b.s)));
  f.beta = acc_t(d.beta);
  f.one_minus_beta = acc_t(d.one_minus_beta);
  return f;
}

// The label-smoothed cross-entropy of a row: (1 - eps) (lse - s_y) + eps (lse - mean_j s_j).
FASTKD_HD double row_cross_entropy(const RowShare& r, double s_y, int64_t vocab, double eps) {
  const double lse = r.one.m + std::log(r.one.s);
  return (1 - eps) * (lse - s_y) + eps * (lse - r.sum_s / double(vocab));
}

template <class acc_t, class Math>
FASTKD_HD acc_t frame_p(const RowFrame<acc_t>& f, acc_t t) {
  return Math::exp((t - f.max_t) * f.inv_t) * f.inv_sum_t;
}
template <class acc_t, class Math>
FASTKD_HD acc_t frame_q(const RowFrame<acc_t>& f, acc_t s) {
  return Math::exp((s - f.max_s) * f.inv_t) * f.inv_sum_b;
}

template <Divergence kKind, class acc_t, class Math>
FASTKD_HD ElementTerms<acc_t> frame_terms(const RowFrame<acc_t>& f, acc_t s, acc_t t, acc_t p, acc_t q) {
  const acc_t d = (t - s) * f.inv_t - f.delta;
  return divergence_terms<kKind, Math>(p, q, d, f.beta, f.one_minus_beta);
}

// Pass 2 of one thread (or, merged, of the row): the divergence's row sums and the largest |qg| and
// |ph| (NaN when the row has one). Only doubles.
struct DivergenceShare {
  double f = 0, qg = 0, ph = 0;
  double max_qg = 0, max_ph = 0;

  FASTKD_HD void merge(const DivergenceShare& o) {
    f += o.f;
    qg += o.qg;
    ph += o.ph;
    max_qg = nan_max(max_qg, o.max_qg);
    max_ph = nan_max(max_ph, o.max_ph);
  }
};

template <Divergence kKind, class acc_t, class Math, class Load, class LoadT>
FASTKD_HD DivergenceShare gather_divergence_share(const Load& s, const LoadT& t, const RowFrame<acc_t>& fr,
                                                  int64_t first, int64_t step, int64_t vocab) {
  FlushedSum<acc_t> f, qg, ph;
  acc_t max_qg = 0, max_ph = 0;
  for (int64_t j = first; j < vocab; j += step) {
    const acc_t sv = s(j), tv = t(j);
    const ElementTerms<acc_t> e =
        frame_terms<kKind, acc_t, Math>(fr, sv, tv, frame_p<acc_t, Math>(fr, tv), frame_q<acc_t, Math>(fr, sv));
    f.add(e.f);
    qg.add(e.qg);
    ph.add(e.ph);
    max_qg = nan_max(max_qg, Math::abs(e.qg));
    max_ph = nan_max(max_ph, Math::abs(e.ph));
  }
  DivergenceShare out;
  out.f = f.total();
  out.qg = qg.total();
  out.ph = ph.total();
  out.max_qg = double(max_qg);
  out.max_ph = double(max_ph);
  return out;
}

// The coefficients of pass 3 for one row: dLoss/ds_j = cs (qg_j - q_j sum qg) + ch (r_j - eps / V -
// [j == y] (1 - eps)) and dLoss/dt_j = cs (ph_j - p_j sum ph), each side times its pre-scale.
struct GradientCoeffs {
  double cs_student = 0, ch_student = 0, cs_teacher = 0;
  double prescale_student = 1, prescale_teacher = 1;  // powers of two (float16 gradients), else 1
};

// cs = w_soft / T on a row in S, ch = w_hard on a row with a target. A float16 side's pre-scale brings
// the row's largest entry near 2^12, from bounds on it that pass 2 measured (within a factor of about
// 2): every finite gradient stays finite, and small entries keep the float16 range below.
// max_p and max_q are the row's largest p and q: 1 / sum_t and 1 / sum_b (at the maxima).
FASTKD_HD GradientCoeffs gradient_coeffs(const DivergenceShare& sums, double max_p, double max_q, double w_soft,
                                         double w_hard, double inv_t, bool soft_row, bool hard_row,
                                         bool fp16_student, bool fp16_teacher) {
  GradientCoeffs c;
  const double cs = soft_row ? w_soft * inv_t : 0.0;
  const double ch = hard_row ? w_hard : 0.0;
  if (fp16_student) {
    const double soft = cs == 0.0 ? 0.0 : std::fabs(cs) * (sums.max_qg + max_q * std::fabs(sums.qg));
    c.prescale_student = fp16_gradient_prescale(soft + std::fabs(ch));
  }
  if (fp16_teacher && cs != 0.0) {
    c.prescale_teacher = fp16_gradient_prescale(std::fabs(cs) * (sums.max_ph + max_p * std::fabs(sums.ph)));
  }
  c.cs_student = cs * c.prescale_student;
  c.ch_student = ch * c.prescale_student;
  c.cs_teacher = cs * c.prescale_teacher;
  return c;
}

// Pass 3 at one element, in acc_t. eps_v = eps / V, y_coef = 1 - eps at the target column (else 0).
template <Divergence kKind, class acc_t, class Math>
FASTKD_HD acc_t student_grad(const RowFrame<acc_t>& fr, acc_t sv, acc_t tv, acc_t cs, acc_t ch, acc_t qg_sum,
                             acc_t eps_v, acc_t y_coef) {
  acc_t g = acc_t(0);
  if (cs != acc_t(0)) {
    const acc_t q = frame_q<acc_t, Math>(fr, sv);
    const ElementTerms<acc_t> e = frame_terms<kKind, acc_t, Math>(fr, sv, tv, frame_p<acc_t, Math>(fr, tv), q);
    g = cs * (e.qg - q * qg_sum);
  }
  if (ch != acc_t(0)) g += ch * (Math::exp(sv - fr.max_s) * fr.inv_sum_1 - eps_v - y_coef);
  return g;
}

template <Divergence kKind, class acc_t, class Math>
FASTKD_HD acc_t teacher_grad(const RowFrame<acc_t>& fr, acc_t sv, acc_t tv, acc_t cs, acc_t ph_sum) {
  if (cs == acc_t(0)) return acc_t(0);
  const acc_t p = frame_p<acc_t, Math>(fr, tv);
  const ElementTerms<acc_t> e = frame_terms<kKind, acc_t, Math>(fr, sv, tv, p, frame_q<acc_t, Math>(fr, sv));
  return cs * (e.ph - p * ph_sum);
}

}  // namespace FASTKD_ISA
}  // namespace fastkd
