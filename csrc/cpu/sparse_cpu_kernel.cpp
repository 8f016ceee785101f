// The sparse-teacher CPU kernel (docs/spec.md, "Sparse (top-k) teacher"), compiled once per ISA like
// distill_cpu_kernel.cpp.
//
// Per row: one pass over the student row for its maximum and one that takes the exps at T (kept in
// a row buffer, still in L2 for the gradient) and the cross-entropy's sums; the K teacher slots once,
// in float64 (K is small), through the slot math of sparse_row.h that the CUDA kernel shares; then one
// pass that writes the dense student gradient, proportional to q_j everywhere, followed by the
// corrections at the K support indices and the target.
#include "cpu/sparse_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)

namespace fastkd::cpu {
inline namespace FASTKD_ISA {
namespace {

using at::vec::Vectorized;
#include "cpu/vec_exp.h"
#include "cpu/vec_widen.h"

#include "cpu/row_blocks.h"  // kFlush, horizontal_sum / horizontal_max, the vector Math

// sum_i x_i of a buffer, fp32 lanes flushed into float64.
template <class acc_t>
double buffer_sum(const acc_t* x, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  double total = 0;
  for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
    const int64_t stop = std::min(n_vec, start + kFlush * kW);
    V part(acc_t(0));
    for (int64_t i = start; i < stop; i += kW) part = part + V::loadu(x + i);
    total += horizontal_sum(part);
  }
  for (int64_t i = n_vec; i < n; ++i) total += double(x[i]);
  return total;
}

struct StudentSums {
  double sum_b = 0;  // sum_j exp((s_j - shift) / T)
  double sum_1 = 0;  // sum_j exp(s_j - shift), for the cross-entropy
  double sum_s = 0;  // sum_j s_j, for label smoothing
};

// Terms of one row's teacher side: the soft term, the factor of the dense part of its gradient
// (dD/db_j = factor * q_j off the support) and the corrections at the support's slots.
struct SoftRow {
  double soft = 0;
  double factor = 0;
  int64_t slots = 0;  // corrections at cls_idx[0..slots)
};

template <class acc_t>
class SparseRowWorker {
  using V = Vectorized<acc_t>;
  static constexpr int64_t kW = V::size();

 public:
  explicit SparseRowWorker(const SparseArgs& a)
      : a_(a),
        widened_(std::is_same_v<acc_t, float> && a.student_dtype != c10::ScalarType::Float ? a.vocab : 0),
        exp_b_(a.vocab),
        exp_1_(a.params.has_hard && a.params.integer_temperature == 0 ? a.vocab : 0),
        narrow_(a.grad_student != nullptr && a.student_dtype != c10::CppTypeToScalarType<acc_t>::value ? a.vocab
                                                                                                        : 0),
        cls_idx_(a.k),
        val_(a.k),
        lq_(a.k),
        corr_(a.k),
        terms_(a.k),
        saved_(a.k) {}

  void run(int64_t row) {
    const int64_t vocab = a_.vocab;
    const int64_t y = a_.target != nullptr ? a_.target[row] : -1;
    const bool hard_row = a_.target != nullptr && y != a_.ignore_index;
    const bool soft_row = a_.soft_mask != nullptr ? a_.soft_mask[row] : (a_.target == nullptr || hard_row);
    if (!soft_row && !hard_row) {  // masked: terms and gradient exactly 0
      a_.row_loss[row] = a_.row_soft[row] = a_.row_hard[row] = 0.0;
      if (a_.grad_student != nullptr) {
        const size_t bytes = c10::elementSize(a_.student_dtype);
        std::memset(static_cast<char*>(a_.grad_student) + row * vocab * bytes, 0, vocab * bytes);
      }
      return;
    }
    const acc_t* s = student_row(row);
    const acc_t mx = row_max(s);
    // An all -inf row: exp(-inf - 0) = 0 keeps the sums exact (a shift of -inf would give NaN).
    const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
    StudentSums sums;
    if (!hard_row) {
      student_pass<false, 1>(s, shift, sums);
    } else {
      switch (a_.params.integer_temperature) {
        case 1: student_pass<true, 1>(s, shift, sums); break;
        case 2: student_pass<true, 2>(s, shift, sums); break;
        case 4: student_pass<true, 4>(s, shift, sums); break;
        default: student_pass<true, 0>(s, shift, sums); break;
      }
    }

    double hard = 0;
    if (hard_row) {
      const double lse1 = double(shift) + std::log(sums.sum_1);
      hard = cross_entropy_term(lse1, double(s[y]), sums.sum_s, vocab, a_.params.label_smoothing);
    }
    SoftRow soft{};
    if (soft_row) soft = teacher_terms(row, s, double(shift), sums.sum_b);
    a_.row_soft[row] = soft.soft;
    a_.row_hard[row] = hard;
    a_.row_loss[row] = a_.params.soft_weight * soft.soft + a_.params.hard_weight * hard;
    if (a_.grad_student != nullptr) write_gradient(row, y, hard_row, soft, sums);
  }

 private:
  const acc_t* student_row(int64_t row) {
    const int64_t base = row * a_.student_row_stride;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (a_.student_dtype == c10::ScalarType::BFloat16) {
        widen(static_cast<const c10::BFloat16*>(a_.student) + base, widened_.data(), a_.vocab);
        return widened_.data();
      }
      if (a_.student_dtype == c10::ScalarType::Half) {
        widen(static_cast<const c10::Half*>(a_.student) + base, widened_.data(), a_.vocab);
        return widened_.data();
      }
    }
    return static_cast<const acc_t*>(a_.student) + base;
  }

  acc_t row_max(const acc_t* s) const {
    const int64_t n_vec = a_.vocab - a_.vocab % kW;
    V m(-std::numeric_limits<acc_t>::infinity());
    for (int64_t i = 0; i < n_vec; i += kW) m = at::vec::maximum(m, V::loadu(s + i));  // propagates NaN
    acc_t out = horizontal_max(m);
    for (int64_t i = n_vec; i < a_.vocab; ++i) out = nan_max(out, s[i]);
    return out;
  }

  // exp(s - shift) from b = exp((s - shift) / T): b^T when T is 1, 2 or 4 (a multiply instead of an
  // exp), else the separate stream.
  template <int kPowT, class X>
  static X power_of(const X& b) {
    if constexpr (kPowT == 1) return b;
    if constexpr (kPowT == 2) return b * b;
    if constexpr (kPowT == 4) {
      const X b2 = b * b;
      return b2 * b2;
    }
    return b;
  }

  // exp((s - shift) / T) into exp_b_ and its sum; with kHard the cross-entropy's sums as well: exp(s -
  // shift) is b^kPowT, or a second exp stream kept in exp_1_ when kPowT == 0 (T not 1, 2 or 4).
  template <bool kHard, int kPowT>
  void student_pass(const acc_t* s, acc_t shift, StudentSums& out) {
    const int64_t n = a_.vocab;
    const int64_t n_vec = n - n % kW;
    const acc_t inv_t = acc_t(a_.params.inv_temperature);
    const V vshift(shift), vinv(inv_t);
    acc_t* eb = exp_b_.data();
    acc_t* e1 = exp_1_.data();
    for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
      const int64_t stop = std::min(n_vec, start + kFlush * kW);
      V pb(acc_t(0)), p1(acc_t(0)), ps(acc_t(0));
      for (int64_t i = start; i < stop; i += kW) {
        const V sv = V::loadu(s + i);
        const V x = sv - vshift;
        const V b = fast_exp(x * vinv);
        b.store(eb + i);
        pb = pb + b;
        if constexpr (kHard) {
          if constexpr (kPowT == 0) {
            const V e = fast_exp(x);
            e.store(e1 + i);
            p1 = p1 + e;
          } else {
            p1 = p1 + power_of<kPowT>(b);
          }
          ps = ps + sv;
        }
      }
      out.sum_b += horizontal_sum(pb);
      if constexpr (kHard) {
        out.sum_1 += horizontal_sum(p1);
        out.sum_s += horizontal_sum(ps);
      }
    }
    for (int64_t i = n_vec; i < n; ++i) {
      const acc_t x = s[i] - shift;
      eb[i] = std::exp(x * inv_t);
      out.sum_b += double(eb[i]);
      if constexpr (kHard) {
        if constexpr (kPowT == 0) {
          e1[i] = std::exp(x);
          out.sum_1 += double(e1[i]);
        } else {
          out.sum_1 += double(power_of<kPowT>(eb[i]));
        }
        out.sum_s += double(s[i]);
      }
    }
  }

  int64_t index_at(int64_t flat) const {
    return a_.indices_int64 ? static_cast<const int64_t*>(a_.indices)[flat]
                            : int64_t(static_cast<const int32_t*>(a_.indices)[flat]);
  }

  // The slot math of sparse_row.h over the row's valid slots (a -inf value is padding; NaN is kept
  // and propagates).
  SoftRow teacher_terms(int64_t row, const acc_t* s, double shift, double sum_b) {
    const double inv_t = a_.sparse.inv_temperature;
    const double log_sum_b = std::log(sum_b);
    SlotSums<double> sums;
    int64_t n = 0;
    for (int64_t k = 0; k < a_.k; ++k) {
      const double v = a_.values[row * a_.k + k];
      if (is_padding(v)) continue;
      cls_idx_[n] = index_at(row * a_.k + k);
      val_[n] = v;
      lq_[n] = student_log_q(double(s[cls_idx_[n]]), shift, inv_t, log_sum_b);
      sums.add(v, lq_[n], a_.sparse);
      ++n;
    }
    double lq_tail = 0;
    if (a_.sparse.bucket) {
      // q_tail summed over the off-support entries (never 1 - sum, which loses a small tail).
      acc_t* eb = exp_b_.data();
      for (int64_t c = 0; c < n; ++c) {
        saved_[c] = eb[cls_idx_[c]];
        eb[cls_idx_[c]] = acc_t(0);
      }
      const double sum_off = buffer_sum(eb, a_.vocab);
      for (int64_t c = n - 1; c >= 0; --c) eb[cls_idx_[c]] = saved_[c];
      lq_tail = std::log(sum_off) - log_sum_b;
    }
    SparseRow<double> r = sparse_row(sums, a_.sparse, lq_tail);
    if (r.empty) return {};  // nothing to distil: no soft term
    ClassSums<double> classes;
    for (int64_t c = 0; c < n; ++c) {
      terms_[c] = sparse_slot_terms(r, val_[c], lq_[c]);
      classes.add(terms_[c].e);
    }
    finish_sparse_row(r, classes);
    for (int64_t c = 0; c < n; ++c) corr_[c] = sparse_slot_correction(r, terms_[c]);
    return {r.soft, r.factor, n};
  }

  void write_gradient(int64_t row, int64_t y, bool hard_row, const SoftRow& soft, const StudentSums& sums) {
    const int64_t n = a_.vocab;
    const int64_t n_vec = n - n % kW;
    const double soft_coef = a_.params.soft_weight * a_.params.inv_temperature;
    const double hard_coef = hard_row ? a_.params.hard_weight : 0.0;
    const double eps = a_.params.label_smoothing;
    const int pow_t = hard_row ? a_.params.integer_temperature : 1;
    // g_j = coef_b exp_b_j + coef_1 exp_1_j - uniform, then the target and the support corrections.
    double coef_b = soft_coef * soft.factor / sums.sum_b;
    if (pow_t == 1) coef_b += hard_coef / sums.sum_b;
    const acc_t cb = acc_t(coef_b);
    const acc_t c1 = pow_t != 1 ? acc_t(hard_coef / sums.sum_1) : acc_t(0);
    const acc_t uniform = acc_t(hard_coef * eps / double(n));
    acc_t* g = narrow_.empty() ? static_cast<acc_t*>(a_.grad_student) + row * n : narrow_.data();
    switch (pow_t) {
      case 1: gradient_pass<1>(g, cb, c1, uniform); break;
      case 2: gradient_pass<2>(g, cb, c1, uniform); break;
      case 4: gradient_pass<4>(g, cb, c1, uniform); break;
      default: gradient_pass<0>(g, cb, c1, uniform); break;
    }
    if (hard_row) g[y] -= acc_t(hard_coef * (1 - eps));
    for (int64_t c = 0; c < soft.slots; ++c) g[cls_idx_[c]] += acc_t(soft_coef * corr_[c]);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (a_.student_dtype == c10::ScalarType::BFloat16) {
        at::vec::convert(g, static_cast<c10::BFloat16*>(a_.grad_student) + row * n, n);
      } else if (a_.student_dtype == c10::ScalarType::Half) {
        at::vec::convert(g, static_cast<c10::Half*>(a_.grad_student) + row * n, n);
      }
    }
  }

  // g = cb exp_b + c1 exp_1 - uniform; exp_1 is exp_b^kPowT (kPowT 1: folded into cb) or exp_1_.
  template <int kPowT>
  void gradient_pass(acc_t* g, acc_t cb, acc_t c1, acc_t uniform) const {
    const int64_t n = a_.vocab;
    const int64_t n_vec = n - n % kW;
    const acc_t* eb = exp_b_.data();
    const acc_t* e1 = exp_1_.data();
    const V vcb(cb), vc1(c1), vu(uniform);
    for (int64_t i = 0; i < n_vec; i += kW) {
      const V b = V::loadu(eb + i);
      if constexpr (kPowT == 1) {
        (b * vcb - vu).store(g + i);
      } else if constexpr (kPowT == 0) {
        (b * vcb + V::loadu(e1 + i) * vc1 - vu).store(g + i);
      } else {
        (b * vcb + power_of<kPowT>(b) * vc1 - vu).store(g + i);
      }
    }
    for (int64_t i = n_vec; i < n; ++i) {
      const acc_t e = kPowT == 0 ? e1[i] : power_of<kPowT>(eb[i]);
      g[i] = kPowT == 1 ? eb[i] * cb - uniform : eb[i] * cb + e * c1 - uniform;
    }
  }

  const SparseArgs& a_;
  std::vector<acc_t> widened_;  // a bf16 / fp16 student row in fp32
  std::vector<acc_t> exp_b_;    // exp((s - shift) / T) of the current row
  std::vector<acc_t> exp_1_;    // exp(s - shift) when T is not 1, 2 or 4
  std::vector<acc_t> narrow_;   // the gradient row before narrowing to bf16 / fp16
  std::vector<int64_t> cls_idx_;  // the valid slots' indices, values, lq and corrections
  std::vector<double> val_, lq_, corr_;
  std::vector<SlotTerms<double>> terms_;
  std::vector<acc_t> saved_;
};

template <class acc_t>
void run_rows(const SparseArgs& a) {
  // Enough rows per task that a task streams ~256K elements.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    SparseRowWorker<acc_t> worker(a);
    for (int64_t row = begin; row < end; ++row) worker.run(row);
  });
}

}  // namespace
}  // namespace FASTKD_ISA

void FASTKD_CAT(sparse_rows_, FASTKD_ISA)(const SparseArgs& args) {
  if (args.student_dtype == c10::ScalarType::Double) {
    run_rows<double>(args);
  } else {
    run_rows<float>(args);
  }
}

}  // namespace fastkd::cpu
