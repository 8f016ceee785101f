// The vocabulary-parallel CPU kernel (vocab_parallel_cpu_kernel.h). Compiled once per ISA, like
// distill_cpu_kernel.cpp, from the same block helpers and element math: the three passes of the row
// engine, each over a rank's columns, split where the ranks must agree on per-row numbers.
#include "cpu/vocab_parallel_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "distill_row.h"

#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)

namespace fastkd::cpu {
inline namespace FASTKD_ISA {
namespace {

using at::vec::Vectorized;
#include "cpu/vec_exp.h"
#include "cpu/vec_widen.h"

constexpr int64_t kBlock = 1024;

#include "cpu/row_blocks.h"
#include "cpu/divergence_blocks.h"

// One thread's block buffers: widened logits, exps, element terms, gradients.
template <class acc_t>
struct VpScratch {
  std::vector<acc_t> s, t, et, es, qg, ph, gs, gt;
  VpScratch() : s(kBlock), t(kBlock), et(kBlock), es(kBlock), qg(kBlock), ph(kBlock), gs(kBlock), gt(kBlock) {}
};

// The local column of a row's target, or -1 when the target is ignore_index or on another rank.
int64_t local_target(const VpArgs& a, int64_t row) {
  if (a.target == nullptr) return -1;
  const int64_t y = a.target[row];
  if (y == a.ignore_index || y < a.vocab_start || y >= a.vocab_start + a.vocab) return -1;
  return y - a.vocab_start;
}

template <class acc_t, class RowFn>
void for_rows(const VpArgs& a, const RowFn& row_fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    VpScratch<acc_t> scratch;
    for (int64_t row = begin; row < end; ++row) row_fn(row, scratch);
  });
}

// Pass 1: the local statistics of both sides, and the student's logit at a local target.
template <class acc_t, bool kSoft, bool kHard>
void stats_rows(const VpArgs& a) {
  for_rows<acc_t>(a, [&](int64_t row, VpScratch<acc_t>& w) {
    RowStats<double> st;
    for (int64_t off = 0; off < a.vocab; off += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - off);
      const acc_t* s = load_block<acc_t>(a.student, a.student_dtype, row * a.student_row_stride + off, n, w.s.data());
      const acc_t* t =
          kSoft ? load_block<acc_t>(a.teacher, a.teacher_dtype, row * a.teacher_row_stride + off, n, w.t.data())
                : nullptr;
      accumulate_block<acc_t, kSoft, kHard, 0, false>(st, s, t, n, a.inv_temperature, w.et.data(), w.es.data());
    }
    const int64_t y = local_target(a, row);
    double* out = a.out + row * kVpStats;
    out[kMaxT] = st.max_t;
    out[kSumT] = st.sum_t;
    out[kMaxS] = st.max_s;
    out[kSumB] = st.sum_b;
    out[kSum1] = st.sum_1;
    out[kSumS] = st.sum_s;
    out[kTargetLogit] = y >= 0 ? load_one(a.student, a.student_dtype, row * a.student_row_stride + y) : 0.0;
  });
}

// A row's frame narrowed to acc_t, and where its exps are taken from (a -inf maximum shifts by 0).
template <class acc_t>
struct RowFrameView {
  acc_t shift_t, shift_s, inv_t;
  BlockFrame<acc_t> block;  // q = exp_s * inv_sum_b, p = exp_t * inv_sum_t, delta, beta
};

template <class acc_t>
RowFrameView<acc_t> frame_view(const VpArgs& a, int64_t row) {
  const double* f = a.frame + row * kVpFrame;
  const auto shift = [](double m) { return m == neg_inf<double>() ? acc_t(0) : acc_t(m); };
  const acc_t inv_t = acc_t(a.inv_temperature);
  return {shift(f[kFrameMaxT]), shift(f[kFrameMaxS]), inv_t,
          BlockFrame<acc_t>{acc_t(f[kFrameInvSumB]), acc_t(f[kFrameInvSumT]), inv_t, acc_t(f[kFrameDelta]),
                            acc_t(a.divergence.beta), acc_t(a.divergence.one_minus_beta)}};
}

// exp((t - max_t) / T) and exp((s - max_s) / T) of one block against the global maxima.
template <class acc_t>
void block_exps(const acc_t* s, const acc_t* t, int64_t n, const RowFrameView<acc_t>& fr, acc_t* et, acc_t* es) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  const V vt(fr.shift_t), vs(fr.shift_s), vinv(fr.inv_t);
  for (int64_t i = 0; i < n_vec; i += kW) {
    fast_exp((V::loadu(t + i) - vt) * vinv).store(et + i);
    fast_exp((V::loadu(s + i) - vs) * vinv).store(es + i);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    et[i] = std::exp((t[i] - fr.shift_t) * fr.inv_t);
    es[i] = std::exp((s[i] - fr.shift_s) * fr.inv_t);
  }
}

// Pass 2: the local sums of f, qg, ph under the global frame.
template <Divergence kKind, class acc_t>
void sums_rows(const VpArgs& a) {
  for_rows<acc_t>(a, [&](int64_t row, VpScratch<acc_t>& w) {
    const RowFrameView<acc_t> fr = frame_view<acc_t>(a, row);
    DivergenceSums sums;
    for (int64_t off = 0; off < a.vocab; off += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - off);
      const acc_t* s = load_block<acc_t>(a.student, a.student_dtype, row * a.student_row_stride + off, n, w.s.data());
      const acc_t* t = load_block<acc_t>(a.teacher, a.teacher_dtype, row * a.teacher_row_stride + off, n, w.t.data());
      block_exps<acc_t>(s, t, n, fr, w.et.data(), w.es.data());
      divergence_sums_block<kKind, acc_t, false>(s, t, w.et.data(), w.es.data(), n, fr.block, w.qg.data(), nullptr,
                                                 sums);
    }
    double* out = a.out + row * kVpSums;
    out[kSumF] = sums.f;
    out[kSumQg] = sums.qg;
    out[kSumPh] = sums.ph;
  });
}

// Pass 3: the local columns' gradients. A row with neither coefficient gets zeros without reading it
// (a masked row's NaN never reaches the gradient).
template <Divergence kKind, class acc_t, bool kTeacher>
void gradient_rows(const VpArgs& a) {
  for_rows<acc_t>(a, [&](int64_t row, VpScratch<acc_t>& w) {
    const double* k = a.coeffs + row * kVpCoeffs;
    const int64_t g_base = row * a.vocab;
    const bool soft = k[kCoefSoft] != 0.0;
    // A row whose target is ignore_index has no hard term, whatever its coefficient.
    const bool hard = a.target != nullptr && a.target[row] != a.ignore_index && k[kCoefHard] != 0.0;
    if (!soft && !hard) {
      if (a.grad_student) zero_row(a.grad_student, a.student_dtype, row, a.vocab);
      if (kTeacher) zero_row(a.grad_teacher, a.teacher_dtype, row, a.vocab);
      return;
    }
    const RowFrameView<acc_t> fr = frame_view<acc_t>(a, row);
    const double* f = a.frame + row * kVpFrame;
    RowCoeffs<acc_t> c{};
    c.max_s = fr.shift_s;
    c.inv_sum_1 = acc_t(f[kFrameInvSum1]);
    c.soft_coef = acc_t(k[kCoefSoft]);
    c.hard_coef = hard ? acc_t(k[kCoefHard]) : acc_t(0);
    c.uniform = hard ? acc_t(k[kCoefHard] * a.label_smoothing / double(a.global_vocab)) : acc_t(0);
    const acc_t target_coef = hard ? acc_t(k[kCoefHard] * (1.0 - a.label_smoothing)) : acc_t(0);
    const acc_t qg_sum = soft ? acc_t(k[kCoefQgSum]) : acc_t(0);
    const acc_t ph_sum = soft ? acc_t(k[kCoefPhSum]) : acc_t(0);
    const int64_t y = hard ? local_target(a, row) : -1;
    for (int64_t off = 0; off < a.vocab; off += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - off);
      const acc_t* s = load_block<acc_t>(a.student, a.student_dtype, row * a.student_row_stride + off, n, w.s.data());
      const acc_t* t = load_block<acc_t>(a.teacher, a.teacher_dtype, row * a.teacher_row_stride + off, n, w.t.data());
      block_exps<acc_t>(s, t, n, fr, w.et.data(), w.es.data());
      if (soft) {
        DivergenceSums unused;
        divergence_sums_block<kKind, acc_t, kTeacher>(s, t, w.et.data(), w.es.data(), n, fr.block, w.qg.data(),
                                                      w.ph.data(), unused);
      } else {  // the hard term alone: soft_coef is 0 and the element terms must not be NaN
        std::fill_n(w.qg.data(), n, acc_t(0));
        std::fill_n(w.ph.data(), n, acc_t(0));
      }
      acc_t* gs = a.grad_student
                      ? grad_target<acc_t>(a.grad_student, a.student_dtype, g_base + off, w.gs.data())
                      : w.gs.data();
      acc_t* gt = kTeacher ? grad_target<acc_t>(a.grad_teacher, a.teacher_dtype, g_base + off, w.gt.data()) : nullptr;
      if (hard) {
        divergence_grad_block<acc_t, true, 0, kTeacher>(s, w.et.data(), w.es.data(), w.qg.data(), w.ph.data(), n,
                                                        fr.block, c, qg_sum, ph_sum, gs, gt);
      } else {
        divergence_grad_block<acc_t, false, 0, kTeacher>(s, w.et.data(), w.es.data(), w.qg.data(), w.ph.data(), n,
                                                         fr.block, c, qg_sum, ph_sum, gs, gt);
      }
      if (a.grad_student) {
        if (y >= off && y < off + n) gs[y - off] -= target_coef;
        store_block<acc_t>(a.grad_student, a.student_dtype, g_base + off, n, gs);
      }
      if constexpr (kTeacher) store_block<acc_t>(a.grad_teacher, a.teacher_dtype, g_base + off, n, gt);
    }
  });
}

template <class acc_t>
void run_stats(const VpArgs& a) {
  const bool soft = a.teacher != nullptr, hard = a.target != nullptr;
  if (soft && hard) return stats_rows<acc_t, true, true>(a);
  if (soft) return stats_rows<acc_t, true, false>(a);
  if (hard) return stats_rows<acc_t, false, true>(a);
  return stats_rows<acc_t, false, false>(a);
}

template <class acc_t>
void run_sums(const VpArgs& a) {
  visit_divergence(a.divergence.kind, [&](auto kind) { sums_rows<decltype(kind)::value, acc_t>(a); });
}

template <class acc_t>
void run_gradients(const VpArgs& a) {
  visit_divergence(a.divergence.kind, [&](auto kind) {
    if (a.grad_teacher != nullptr) return gradient_rows<decltype(kind)::value, acc_t, true>(a);
    gradient_rows<decltype(kind)::value, acc_t, false>(a);
  });
}

bool float64(const VpArgs& a) { return a.student_dtype == c10::ScalarType::Double; }

}  // namespace
}  // namespace FASTKD_ISA

void FASTKD_CAT(vp_stats_, FASTKD_ISA)(const VpArgs& a) {
  float64(a) ? run_stats<double>(a) : run_stats<float>(a);
}

void FASTKD_CAT(vp_sums_, FASTKD_ISA)(const VpArgs& a) {
  float64(a) ? run_sums<double>(a) : run_sums<float>(a);
}

void FASTKD_CAT(vp_gradients_, FASTKD_ISA)(const VpArgs& a) {
  float64(a) ? run_gradients<double>(a) : run_gradients<float>(a);
}

}  // namespace fastkd::cpu
