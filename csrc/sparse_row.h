// Per-row math of the sparse (top-k) teacher (docs/spec.md, "Sparse (top-k) teacher"), shared by the
// CPU and CUDA kernels of fastkd::sparse_distill_rows.
//
// A row's teacher is K slots: an index i_c and a value v_c (-inf: a padding slot, which the callers
// skip). The kernel gathers the student's statistics over the whole row (its shift, log sum_j
// exp((s_j - shift) / T), and with tail "bucket" log q_tail summed over the entries off the support)
// and gives each valid slot lq_c, the student's full-vocabulary log q at i_c (student_log_q). What is
// left is per slot or per row, so the CPU runs the two reductions below as loops and the CUDA kernel as
// block reductions:
//   1. SlotSums over the valid slots; sparse_row() turns them into the row's frame (the tail class,
//      the teacher's normaliser, the support's share of q).
//   2. ClassSums of sparse_slot_terms(); finish_sparse_row() adds the tail class and gives the soft
//      term and the factor of the dense gradient (dD/db_j = factor * q_j off the support).
// Then sparse_slot_correction() is dD/db at a slot's index beyond that factor * q_j.
// Everything runs in F = double on both devices: K is small, and the tail and the support's sums
// need the digits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "divergence_row.h"
#include "log_sum_exp.h"

namespace fastkd {

// How a call compares teacher and student (plain data, fixed for the call).
struct SparseRowConfig {
  DivergenceParams divergence;
  double inv_temperature = 1.0;
  // forward KL against the full-vocabulary student softmax ("forward_kl" with "renormalize"); otherwise
  // the divergence is taken over the support's classes (plus the tail class when `bucket`).
  bool full_forward_kl = true;
  bool bucket = false;  // the teacher's remaining mass is one more class
};

inline namespace FASTKD_ISA {

// The Math of divergence_row.h on scalars.
template <class F>
struct ScalarMath {
  static FASTKD_HD F exp(F x) { return std::exp(x); }
  static FASTKD_HD F expm1(F x) { return std::expm1(x); }
  static FASTKD_HD F log(F x) { return std::log(x); }
  static FASTKD_HD F abs(F x) { return std::fabs(x); }
  static FASTKD_HD F clamp(F x, F lo, F hi) { return x != x ? x : (x < lo ? lo : (x > hi ? hi : x)); }
  static FASTKD_HD F where_zero(F p, F x) { return p == F(0) ? F(0) : x; }
  static FASTKD_HD F where_lt(F x, F y, F a, F b) { return x < y ? a : b; }
  static FASTKD_HD F sign(F x) { return F(x > F(0)) - F(x < F(0)); }
};

template <class F>
FASTKD_HD bool is_padding(F value) {
  return value == -std::numeric_limits<F>::infinity();
}

// log q_j at T of a student logit, from the row's shift and log sum_j exp((s_j - shift) / T).
template <class F>
FASTKD_HD F student_log_q(F s, F shift, F inv_t, F log_sum_b) {
  return (s - shift) * inv_t - log_sum_b;
}

// The label-smoothed cross-entropy of a row from its log sum_j exp(s_j), s_y and sum_j s_j.
template <class F>
FASTKD_HD F cross_entropy_term(F lse, F s_y, F sum_s, int64_t vocab, F eps) {
  return (F(1) - eps) * (lse - s_y) + eps * (lse - sum_s / F(vocab));
}

// Reduction 1, over the valid slots.
template <class F>
struct SlotSums {
  LogSumExp<F> v;  // of the values at T = 1: the mass the slots list (tail "bucket")
  LogSumExp<F> a;  // of the values at T: the teacher's normaliser
  LogSumExp<F> q;  // of the slots' lq: the support's share of the student (the support rule)
  F valid = 0;     // how many slots are valid

  // Only the sums the call's tail and divergence read are taken.
  FASTKD_HD void add(F value, F lq, const SparseRowConfig& cfg) {
    a.add(value, F(cfg.inv_temperature));
    if (cfg.bucket) {
      v.add(value, F(1));
    } else if (!cfg.full_forward_kl) {
      q.add(lq, F(1));
    }
    valid += F(1);
  }
  FASTKD_HD void merge(const SlotSums& o, F inv_t) {
    v.merge(o.v, F(1));
    a.merge(o.a, inv_t);
    q.merge(o.q, F(1));
    valid += o.valid;
  }
};

// Reduction 2, over the valid slots' sparse_slot_terms().
template <class F>
struct ClassSums {
  F f = 0;   // the soft term
  F qg = 0;  // sum_c q_c dD/dq_c

  FASTKD_HD void add(const ElementTerms<F>& e) {
    f += e.f;
    qg += e.qg;
  }
  FASTKD_HD void merge(const ClassSums& o) {
    f += o.f;
    qg += o.qg;
  }
};

// One row's frame: how a slot's value and lq become its class's log p and log q.
template <class F>
struct SparseRow {
  Divergence kind = Divergence::ForwardKL;
  F inv_t = 1, beta = 0, one_minus_beta = 1;
  F lse_a = 0;    // log sum over the classes of exp(v_c / T) (the tail class included)
  F lq_norm = 0;  // subtracted from a slot's lq: the support's log q mass (the support rule), else 0
  F tail_value = -std::numeric_limits<F>::infinity();  // bucket: the tail's T = 1 log-prob
  F lq_tail = -std::numeric_limits<F>::infinity();     // bucket: log q_tail
  bool full = true;     // forward KL with the full-vocabulary q
  bool bucket = false;
  bool empty = false;   // no soft term: "renormalize" with no valid slot
  // Set by finish_sparse_row():
  F soft = 0;    // D
  F sum_qg = 0;  // sum over the classes of q_c dD/dq_c
  F factor = 0;  // dD/db_j = factor * q_j off the support
};

// The row's frame from reduction 1; lq_tail is log q_tail (tail "bucket" only, else unused).
template <class F>
FASTKD_HD SparseRow<F> sparse_row(const SlotSums<F>& sums, const SparseRowConfig& cfg, F lq_tail) {
  SparseRow<F> r;
  r.kind = cfg.divergence.kind;
  r.inv_t = F(cfg.inv_temperature);
  r.beta = F(cfg.divergence.beta);
  r.one_minus_beta = F(cfg.divergence.one_minus_beta);
  r.bucket = cfg.bucket;
  r.full = cfg.full_forward_kl && !cfg.bucket;
  r.empty = !cfg.bucket && sums.valid == F(0);
  LogSumExp<F> a = sums.a;
  if (r.bucket) {
    // The tail's log(1 - sum_k p_k), through expm1 so that a small tail keeps its digits; empty (-inf)
    // when the listed mass reaches 1.
    const F lse_v = sums.v.value(F(1));
    r.tail_value = lse_v != lse_v ? lse_v : lse_v < F(0) ? std::log(-std::expm1(lse_v))
                                                            : -std::numeric_limits<F>::infinity();
    a.add(r.tail_value, r.inv_t);
    r.lq_tail = lq_tail;
  }
  r.lse_a = a.value(r.inv_t);
  if (!r.full && !r.bucket) r.lq_norm = sums.q.value(F(1));  // q restricted to the support, renormalised
  return r;
}

// One class's student probability and divergence terms.
template <class F>
struct SlotTerms {
  F q;
  ElementTerms<F> e;
};

// The divergence is chosen per class at run time: a row has K + 1 classes, against V elements.
template <class F>
FASTKD_HD SlotTerms<F> class_terms(const SparseRow<F>& r, F lp, F lq) {
  using M = ScalarMath<F>;
  SlotTerms<F> t;
  t.q = std::exp(lq);
  const F p = std::exp(lp), d = lp - lq, b = r.beta, nb = r.one_minus_beta;
  switch (r.kind) {
    case Divergence::ReverseKL: t.e = divergence_terms<Divergence::ReverseKL, M>(p, t.q, d, b, nb); break;
    case Divergence::JSD: t.e = divergence_terms<Divergence::JSD, M>(p, t.q, d, b, nb); break;
    case Divergence::TVD: t.e = divergence_terms<Divergence::TVD, M>(p, t.q, d, b, nb); break;
    case Divergence::SkewForwardKL: t.e = divergence_terms<Divergence::SkewForwardKL, M>(p, t.q, d, b, nb); break;
    case Divergence::SkewReverseKL: t.e = divergence_terms<Divergence::SkewReverseKL, M>(p, t.q, d, b, nb); break;
    default: t.e = divergence_terms<Divergence::ForwardKL, M>(p, t.q, d, b, nb); break;
  }
  return t;
}

// A valid slot's terms from its value and its full-vocabulary lq.
template <class F>
FASTKD_HD SlotTerms<F> sparse_slot_terms(const SparseRow<F>& r, F value, F lq) {
  return class_terms(r, value * r.inv_t - r.lse_a, lq - r.lq_norm);
}

// The soft term and the dense gradient's factor from reduction 2 (the tail class added here).
template <class F>
FASTKD_HD void finish_sparse_row(SparseRow<F>& r, const ClassSums<F>& sums) {
  if (r.empty) return;
  r.soft = sums.f;
  r.sum_qg = sums.qg;
  if (r.full) {
    r.factor = F(1);  // dD/db = q - p: q_j everywhere, -p at the support
    return;
  }
  if (!r.bucket) return;  // the support rule: no gradient off the support
  const SlotTerms<F> tail = class_terms(r, r.tail_value * r.inv_t - r.lse_a, r.lq_tail);
  r.soft += tail.e.f;
  r.sum_qg += tail.e.qg;
  // Off the support dD/db_j = G_tail q_j / q_tail: the tail's class logit is lse of those b_j.
  const F g_tail = tail.e.qg - tail.q * r.sum_qg;
  r.factor = tail.q > F(0) ? g_tail / tail.q : F(0);
}

// dD/db at a valid slot's index, beyond the factor * q_j that the dense part of the gradient holds.
template <class F>
FASTKD_HD F sparse_slot_correction(const SparseRow<F>& r, const SlotTerms<F>& t) {
  if (r.full) return t.e.qg;
  return t.e.qg - t.q * r.sum_qg - r.factor * t.q;
}

}  // namespace FASTKD_ISA
}  // namespace fastkd
