// The divergence family as policies over one row (docs/spec.md, "Divergences"), shared by the CPU
// and CUDA kernels.
//
// Every divergence here is a sum over the vocabulary of an element term f(p_j, q_j), p = softmax(t/T)
// (teacher), q = softmax(s/T) (student). Its gradients with respect to the scaled logits
// a = t/T and b = s/T follow from the softmax Jacobian:
//     dD/db_j = qg_j - q_j * sum_i qg_i,   qg = q * df/dq
//     dD/da_j = ph_j - p_j * sum_i ph_i,   ph = p * df/dp
// So a divergence is just its element function returning (f, qg, ph); a kernel gathers the three
// row sums in one pass and writes the gradients in the next. Each element function works on
// d = log p - log q, computed from the logits, so near-identical rows lose nothing to cancellation,
// and every product with p or q is 0 where that probability is 0 (a -inf logit), never 0 * inf.
//
// Math supplies, for the value type V (a scalar or a SIMD vector): exp, expm1, log, abs,
// where_lt(x, y, a, b) (a where x < y else b), where_zero(p, x) (0 where p == 0 else x),
// clamp(x, lo, hi) and sign(x); optionally exp_expm1(x, e, em1) and log1p(u, y), cheaper forms of
// what the mixtures need (see mixture()), in which case it need not supply log.
#pragma once

#include <cstdint>
#include <type_traits>

#include "distill_row.h"

namespace fastkd {

enum class Divergence : int {
  ForwardKL = 0,      // KL(p || q)                         (Hinton et al. 2015)
  ReverseKL = 1,      // KL(q || p)                         (MiniLLM, Gu et al. 2024)
  JSD = 2,            // beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD)
  TVD = 3,            // 1/2 sum |p - q|
  SkewForwardKL = 4,  // KL(p || beta p + (1 - beta) q)    (DistiLLM, Ko et al. 2024)
  SkewReverseKL = 5,  // KL(q || beta q + (1 - beta) p)    (DistiLLM)
};

// Calls f(std::integral_constant<Divergence, kind>{}): the one switch from a run-time divergence to the
// compile-time one of a kernel's template (host code: launches and CPU row workers).
template <class F>
decltype(auto) visit_divergence(Divergence kind, F&& f) {
  using D = Divergence;
  switch (kind) {
    case D::ReverseKL: return f(std::integral_constant<D, D::ReverseKL>{});
    case D::JSD: return f(std::integral_constant<D, D::JSD>{});
    case D::TVD: return f(std::integral_constant<D, D::TVD>{});
    case D::SkewForwardKL: return f(std::integral_constant<D, D::SkewForwardKL>{});
    case D::SkewReverseKL: return f(std::integral_constant<D, D::SkewReverseKL>{});
    default: return f(std::integral_constant<D, D::ForwardKL>{});
  }
}

// beta, and its complement computed once in double so that 1 - beta keeps its low bits.
struct DivergenceParams {
  Divergence kind = Divergence::ForwardKL;
  double beta = 0.0;
  double one_minus_beta = 1.0;
};

// The element terms of one divergence at one element (or one vector of elements).
template <class V>
struct ElementTerms {
  V f;   // the element's share of D
  V qg;  // q * df/dq
  V ph;  // p * df/dp
};

inline namespace FASTKD_ISA {

// The power of two a float16 gradient is stored multiplied by, from a bound on its largest entry: it
// brings that entry near 2^12 (1 when the bound is 0 or not finite). Host and device compute it alike.
FASTKD_HD double fp16_gradient_prescale(double bound) {
  if (!(bound > 0) || !std::isfinite(bound)) return 1.0;
  const int exponent = int(std::floor(std::log2(4096.0 / bound)));
  return std::ldexp(1.0, exponent < -24 ? -24 : (exponent > 40 ? 40 : exponent));
}

// u = m / x and log(u) for a mixture m = w y + (1 - w) x of two distributions, from dc = log y - log x
// (clamped to [-80, 80]) without cancellation: u = 1 + w expm1(dc) near dc = 0 (log1p through
// Goldberg's log(u) * y / (u - 1), which needs only log), and u = (1 - w) + w exp(dc) for dc < -1,
// where 1 - w comes exact from the host (w = 1 would otherwise leave e^dc lost next to 1). u is
// positive and finite for every w in [0, 1] and every clamped dc, so log(u) is finite too.
template <class Math, class V>
struct Mixture {
  V ratio;      // m / x
  V log_ratio;  // log(m / x)
};

// exp(x) and expm1(x) for |x| <= 80: from one range reduction where Math has exp_expm1 (the CPU's
// vector path), else one call each.
template <class Math, class V>
FASTKD_HD void exp_and_expm1(V x, V& e, V& em1) {
  if constexpr (requires(V& a, V& b) { Math::exp_expm1(x, a, b); }) {
    Math::exp_expm1(x, e, em1);
  } else {
    e = Math::exp(x);
    em1 = Math::expm1(x);
  }
}

// log(u) = log1p(y) for u = 1 + y rounded, y exact, u positive and finite. A Math with log1p(u, y)
// supplies it (the CPU's vector path runs its log polynomial on y itself near u = 1); otherwise
// Goldberg's log(u) * y / (u - 1), and y itself where u rounds to 1.
template <class Math, class V>
FASTKD_HD V log1p_of(V u, V y) {
  if constexpr (requires { Math::log1p(u, y); }) {
    return Math::log1p(u, y);
  } else {
    const V u_minus_one = u - V(1);
    return Math::where_zero(u_minus_one, Math::log(u) * (y / u_minus_one)) + (y - Math::where_zero(u_minus_one, y));
  }
}

template <class Math, class V>
FASTKD_HD Mixture<Math, V> mixture(V dc, V w, V w_bar) {
  const V one(1);
  V e, em1;
  exp_and_expm1<Math>(dc, e, em1);
  const V far = w_bar + w * e;
  const V w_em1 = w * em1;
  const V u = Math::where_lt(dc, V(-1), far, one + w_em1);
  const V y = Math::where_lt(dc, V(-1), u - one, w_em1);
  return {u, log1p_of<Math>(u, y)};
}

// d clamped to [-80, 80] for the mixtures: past that, the smaller probability is below e^-80 of the
// larger and its terms are 0 to any precision. d where p = q = 0 (both logits -inf) has no value;
// such an element contributes 0 to every sum, so 0 stands in (where_zero(p + q, d)).
template <class Math, class V>
FASTKD_HD V clamped_log_ratio(V d) {
  return Math::clamp(d, V(-80), V(80));
}

// f, qg, ph of one element. d = log p - log q (+-inf where one side is 0, NaN where both are).
template <Divergence kKind, class Math, class V>
FASTKD_HD ElementTerms<V> divergence_terms(V p, V q, V d, V beta, V one_minus_beta) {
  ElementTerms<V> e;
  if constexpr (kKind == Divergence::ForwardKL) {
    e.f = Math::where_zero(p, p * d);
    e.qg = V(0) - p;
    e.ph = e.f + p;
  } else if constexpr (kKind == Divergence::ReverseKL) {
    e.f = Math::where_zero(q, V(0) - q * d);
    e.qg = e.f + q;
    e.ph = V(0) - q;
  } else if constexpr (kKind == Divergence::TVD) {
    const V diff = q - p;
    const V half(0.5);
    e.f = half * Math::abs(diff);
    const V sg = Math::sign(diff);
    e.qg = half * q * sg;
    e.ph = V(0) - half * p * sg;
  } else {
    const V dc = clamped_log_ratio<Math>(Math::where_zero(p + q, d));
    if constexpr (kKind == Divergence::SkewReverseKL) {
      // m = beta q + (1 - beta) p: the weight on p is 1 - beta.
      const Mixture<Math, V> mq = mixture<Math>(dc, one_minus_beta, beta);
      const V log_q_m = V(0) - mq.log_ratio;
      const V e_pm = one_minus_beta * p / mq.ratio;  // (1 - beta) p q / m
      e.f = q * log_q_m;  // log_q_m is finite: 0 where q is 0
      e.ph = V(0) - e_pm;
      e.qg = e.f + e_pm;
    } else {
      // m = beta p + (1 - beta) q: the weight on p is beta.
      const Mixture<Math, V> mq = mixture<Math>(dc, beta, one_minus_beta);
      const V log_q_m = V(0) - mq.log_ratio;
      const V log_p_m = dc + log_q_m;  // both logs finite: the terms are 0 where p or q is 0
      if constexpr (kKind == Divergence::JSD) {
        const V a = beta * p * log_p_m;
        const V b = one_minus_beta * q * log_q_m;
        e.f = a + b;
        e.qg = b;
        e.ph = a;
      } else {  // SkewForwardKL
        const V e_pq = one_minus_beta * p / mq.ratio;  // (1 - beta) p q / m
        e.f = p * log_p_m;
        e.qg = V(0) - e_pq;
        e.ph = e.f + e_pq;
      }
    }
  }
  return e;
}

}  // namespace FASTKD_ISA
}  // namespace fastkd
