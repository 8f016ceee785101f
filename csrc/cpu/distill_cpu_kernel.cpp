// The fused CPU kernel. Compiled once per ISA (see CMakeLists.txt): the same source becomes
// distill_rows_DEFAULT, distill_rows_AVX2 and distill_rows_AVX512.
//
// Rows run in parallel. Within a row, pass 1 streams the row in L1-sized blocks and gathers the
// statistics of distill_row.h (per block: the block maxima, then exp sums relative to the new running
// maxima, so each element costs one exp per stream and no per-element rescale); pass 2 re-reads the
// row, which is still in L2, and writes the gradient. bf16 / fp16 blocks are widened to fp32 in an
// L1 buffer; sums within a block are fp32 vector lanes, sums across blocks are fp64.
#include "cpu/distill_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
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

constexpr int64_t kBlock = 1024;  // elements per block: 4 fp32 streams of 4 KiB stay in L1

#include "cpu/row_blocks.h"

// Pass 2 on one block: the gradients (before the target-class correction) and, when kRefine, the
// block's share of the KL refinement sum. q and p come from pass 1's exps (q = exp_s * q_scale,
// p = exp_t * p_scale); the logits are read again only for what needs d = (t - s) / T (the teacher
// gradient, the refinement) or a second exp stream (a non-integer T with a hard term).
template <class acc_t, bool kSoft, bool kHard, int kPowT, bool kTeacher, bool kRefine>
double gradient_block(const acc_t* s, const acc_t* t, const acc_t* exp_t, const acc_t* exp_s, int64_t n,
                      const RowCoeffs<acc_t>& c, acc_t q_scale, acc_t p_scale, acc_t* gs, acc_t* gt) {
  using V = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  using SM = ScalarMath<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  constexpr bool kNeedLogits = kTeacher || kRefine || (kHard && kPowT == 0);
  double refinement = 0;
  const V vq(q_scale), vp(p_scale);
  for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
    const int64_t stop = std::min(n_vec, start + kFlush * kW);
    V part(acc_t(0));
    for (int64_t i = start; i < stop; i += kW) {
      const V q = V::loadu(exp_s + i) * vq;
      const V p = V::loadu(exp_t + i) * vp;
      const V sv = kNeedLogits ? V::loadu(s + i) : V(acc_t(0));
      const V tv = kNeedLogits ? V::loadu(t + i) : V(acc_t(0));
      element_student_grad<VM, kHard, kPowT>(sv, q, p, c).store(gs + i);
      if constexpr (kTeacher) element_teacher_grad<VM>(sv, tv, p, c).store(gt + i);
      if constexpr (kRefine) part = part + element_kl_refinement<VM>(sv, tv, q, c);
    }
    if constexpr (kRefine) refinement += horizontal_sum(part);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t q = exp_s[i] * q_scale;
    const acc_t p = exp_t[i] * p_scale;
    const acc_t sv = kNeedLogits ? s[i] : acc_t(0);
    gs[i] = element_student_grad<SM, kHard, kPowT>(sv, q, p, c);
    if constexpr (kTeacher) gt[i] = element_teacher_grad<SM>(s[i], t[i], p, c);
    if constexpr (kRefine) refinement += element_kl_refinement<SM>(s[i], t[i], q, c);
  }
  return refinement;
}

// The KL refinement sum of one block when no gradient is wanted.
template <class acc_t>
double refinement_block(const acc_t* s, const acc_t* t, int64_t n, const RowCoeffs<acc_t>& c) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  double refinement = 0;
  const V shift_s(c.max_s), inv_t(c.inv_t), inv_sum_b(c.inv_sum_b);
  for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
    const int64_t stop = std::min(n_vec, start + kFlush * kW);
    V part(acc_t(0));
    for (int64_t i = start; i < stop; i += kW) {
      const V sv = V::loadu(s + i);
      const V q = fast_exp((sv - shift_s) * inv_t) * inv_sum_b;
      part = part + element_kl_refinement<VecMath<acc_t>>(sv, V::loadu(t + i), q, c);
    }
    refinement += horizontal_sum(part);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t q = std::exp((s[i] - c.max_s) * c.inv_t) * c.inv_sum_b;
    refinement += element_kl_refinement<ScalarMath<acc_t>>(s[i], t[i], q, c);
  }
  return refinement;
}

template <class acc_t>
RowCoeffs<acc_t> narrow(const RowCoeffs<double>& d) {
  return RowCoeffs<acc_t>{acc_t(d.max_t),       acc_t(d.max_s),     acc_t(d.inv_t),
                          acc_t(d.inv_sum_t),   acc_t(d.inv_sum_b), acc_t(d.inv_sum_1), acc_t(d.sum_b),
                          acc_t(d.soft_coef),   acc_t(d.hard_coef), acc_t(d.uniform),
                          acc_t(d.target_coef), acc_t(d.teacher_shift), d.refine};
}

// Per-thread L1 buffers for widened inputs and narrowed gradients.
struct Scratch {
  alignas(64) double s[kBlock];
  alignas(64) double t[kBlock];
  alignas(64) double gs[kBlock];
  alignas(64) double gt[kBlock];
};

#include "cpu/divergence_blocks.h"

// One row: pass 1 (statistics), then, for forward KL, pass 2 (gradients and KL refinement) over the
// row again, which is still in L2. Any other divergence runs its passes 2 and 3 (divergence_blocks.h)
// over pass 1's exps.
template <class acc_t, bool kSoft, bool kHard, int kPowT>
class RowWorker {
 public:
  RowWorker(const RowsArgs& a, Scratch& scratch)
      : a_(a),
        sbuf_(reinterpret_cast<acc_t*>(scratch.s)),
        tbuf_(reinterpret_cast<acc_t*>(scratch.t)),
        gsbuf_(reinterpret_cast<acc_t*>(scratch.gs)),
        gtbuf_(reinterpret_cast<acc_t*>(scratch.gt)),
        exp_t_(a.vocab),
        exp_s_(a.vocab),
        qg_(a.divergence.kind == Divergence::ForwardKL ? 0 : a.vocab),
        ph_(a.divergence.kind == Divergence::ForwardKL || a.grad_teacher == nullptr ? 0 : a.vocab),
        block_(a.block_size > 0 && a.block_size < kBlock ? a.block_size : kBlock),
        shifts_((a.vocab + block_ - 1) / block_) {}

  void run(int64_t row) {
    const int64_t vocab = a_.vocab;
    const int64_t y = a_.target != nullptr ? a_.target[row] : -1;
    const bool hard_row = kHard && y != a_.ignore_index;
    const bool soft_row = a_.soft_mask != nullptr ? a_.soft_mask[row] : (a_.target == nullptr || hard_row);
    if (!soft_row && !hard_row) {  // masked: terms and gradients exactly 0
      a_.row_loss[row] = a_.row_soft[row] = a_.row_hard[row] = 0.0;
      if (a_.grad_student) zero_row(a_.grad_student, a_.student_dtype, row, vocab);
      if (a_.grad_teacher) zero_row(a_.grad_teacher, a_.teacher_dtype, row, vocab);
      return;
    }
    s_base_ = row * a_.student_row_stride;
    t_base_ = row * a_.teacher_row_stride;
    g_base_ = row * vocab;
    RowStats<double> st;
    for (int64_t off = 0; off < vocab; off += block_) {
      const int64_t n = std::min(block_, vocab - off);
      shifts_[off / block_] = statistics_block(st, off, n);
    }
    const double s_target = hard_row ? load_one(a_.student, a_.student_dtype, s_base_ + y) : 0.0;
    RowCoeffs<double> coeffs{};
    RowLoss<double> loss = finalize<double>(st, s_target, a_.params, /*grad_scale=*/1.0, &coeffs);
    if (!soft_row) {
      loss.soft = 0;
      coeffs.soft_coef = 0;
      coeffs.refine = false;
    }
    if (!hard_row) {
      loss.hard = 0;
      coeffs.hard_coef = coeffs.uniform = coeffs.target_coef = 0;
    }
    const RowCoeffs<acc_t> c = narrow<acc_t>(coeffs);
    const bool want_teacher = kSoft && a_.grad_teacher != nullptr;
    const bool want_grad = a_.grad_student != nullptr || want_teacher;
    if (soft_row && a_.divergence.kind != Divergence::ForwardKL) {
      loss.soft = divergence_passes(st, coeffs, c, hard_row ? y : -1, want_grad);
    } else if (want_grad) {
      const double refinement = c.refine ? gradient_pass<true>(hard_row ? y : -1, coeffs, c)
                                         : gradient_pass<false>(hard_row ? y : -1, coeffs, c);
      if (c.refine) refine_soft(loss, refinement, a_.params);
    } else if (kSoft && c.refine) {
      double refinement = 0;
      for (int64_t off = 0; off < vocab; off += block_) {
        const int64_t n = std::min(block_, vocab - off);
        refinement += refinement_block<acc_t>(student(off, n), teacher(off, n), n, c);
      }
      refine_soft(loss, refinement, a_.params);
    }
    a_.row_soft[row] = loss.soft;
    a_.row_hard[row] = loss.hard;
    a_.row_loss[row] = a_.params.soft_weight * loss.soft + a_.params.hard_weight * loss.hard;
  }

 private:
  const acc_t* student(int64_t offset, int64_t n) {
    return load_block<acc_t>(a_.student, a_.student_dtype, s_base_ + offset, n, sbuf_);
  }
  const acc_t* teacher(int64_t offset, int64_t n) {
    return kSoft ? load_block<acc_t>(a_.teacher, a_.teacher_dtype, t_base_ + offset, n, tbuf_) : nullptr;
  }
  BlockFrame<acc_t> frame(int64_t off, const RowCoeffs<double>& cd, double delta) const {
    const BlockShift& shift = shifts_[off / block_];
    return {acc_t(block_factor(shift.s, cd.max_s, cd.inv_t) * cd.inv_sum_b),
            acc_t(block_factor(shift.t, cd.max_t, cd.inv_t) * cd.inv_sum_t),
            acc_t(cd.inv_t),
            acc_t(delta),
            acc_t(a_.divergence.beta),
            acc_t(a_.divergence.one_minus_beta)};
  }

  // Pass 1 on one block. Only forward KL reads w and max_d: the other divergences take D from their
  // own sums.
  BlockShift statistics_block(RowStats<double>& st, int64_t off, int64_t n) {
    const acc_t* s = student(off, n);
    const acc_t* t = teacher(off, n);
    acc_t* et = exp_t_.data() + off;
    acc_t* es = exp_s_.data() + off;
    const double inv_t = a_.params.inv_temperature;
    if (a_.divergence.kind == Divergence::ForwardKL) {
      return accumulate_block<acc_t, kSoft, kHard, kPowT, true>(st, s, t, n, inv_t, et, es);
    }
    return accumulate_block<acc_t, kSoft, kHard, kPowT, false>(st, s, t, n, inv_t, et, es);
  }

  template <bool kRefine>
  double gradient_pass(int64_t y, const RowCoeffs<double>& cd, const RowCoeffs<acc_t>& c) {
    const bool need_logits = kRefine || a_.grad_teacher != nullptr || (kHard && kPowT == 0);
    double refinement = 0;
    for (int64_t off = 0; off < a_.vocab; off += block_) {
      const int64_t n = std::min(block_, a_.vocab - off);
      const acc_t* s = need_logits ? student(off, n) : nullptr;
      const acc_t* t = need_logits ? teacher(off, n) : nullptr;
      const BlockFrame<acc_t> fr = frame(off, cd, 0.0);
      const acc_t* et = exp_t_.data() + off;
      const acc_t* es = exp_s_.data() + off;
      // Teacher gradient alone: the student's is computed into scratch and dropped.
      acc_t* gs = a_.grad_student ? grad_target<acc_t>(a_.grad_student, a_.student_dtype, g_base_ + off, gsbuf_)
                                  : gsbuf_;
      if (kSoft && a_.grad_teacher != nullptr) {
        acc_t* gt = grad_target<acc_t>(a_.grad_teacher, a_.teacher_dtype, g_base_ + off, gtbuf_);
        refinement += gradient_block<acc_t, kSoft, kHard, kPowT, kSoft, kRefine>(s, t, et, es, n, c, fr.q_scale,
                                                                                 fr.p_scale, gs, gt);
        store_block<acc_t>(a_.grad_teacher, a_.teacher_dtype, g_base_ + off, n, gt);
      } else {
        refinement += gradient_block<acc_t, kSoft, kHard, kPowT, false, kRefine>(s, t, et, es, n, c, fr.q_scale,
                                                                                  fr.p_scale, gs, nullptr);
      }
      finish_student_block(gs, off, n, y, c);
    }
    return refinement;
  }

  // The target-class correction and the narrowing store of one block of the student gradient.
  void finish_student_block(acc_t* gs, int64_t off, int64_t n, int64_t y, const RowCoeffs<acc_t>& c) {
    if (a_.grad_student == nullptr) return;
    if (kHard && y >= off && y < off + n) gs[y - off] -= c.target_coef;
    store_block<acc_t>(a_.grad_student, a_.student_dtype, g_base_ + off, n, gs);
  }

  // Passes 2 and 3 of a divergence other than forward KL; returns D(p, q).
  double divergence_passes(const RowStats<double>& st, const RowCoeffs<double>& cd, const RowCoeffs<acc_t>& c,
                           int64_t y, bool want_grad) {
    return visit_divergence(a_.divergence.kind, [&](auto kind) {
      return divergence_passes<decltype(kind)::value>(st, cd, c, y, want_grad);
    });
  }

  template <Divergence kKind>
  double divergence_passes(const RowStats<double>& st, const RowCoeffs<double>& cd, const RowCoeffs<acc_t>& c,
                           int64_t y, bool want_grad) {
    // lse(t / T) - lse(s / T), the maxima split out so that near-equal rows keep their low bits.
    const double delta = (st.max_t - st.max_s) * cd.inv_t + (std::log(st.sum_t) - std::log(st.sum_b));
    const bool want_teacher = want_grad && a_.grad_teacher != nullptr;
    DivergenceSums sums;
    for (int64_t off = 0; off < a_.vocab; off += block_) {
      const int64_t n = std::min(block_, a_.vocab - off);
      const BlockFrame<acc_t> fr = frame(off, cd, delta);
      const acc_t* s = student(off, n);
      const acc_t* t = teacher(off, n);
      const acc_t* et = exp_t_.data() + off;
      const acc_t* es = exp_s_.data() + off;
      if (want_teacher) {
        divergence_sums_block<kKind, acc_t, true>(s, t, et, es, n, fr, qg_.data() + off, ph_.data() + off, sums);
      } else {
        divergence_sums_block<kKind, acc_t, false>(s, t, et, es, n, fr, qg_.data() + off, nullptr, sums);
      }
    }
    if (!want_grad) return sums.f;
    constexpr bool kNeedLogits = kHard && kPowT == 0;
    for (int64_t off = 0; off < a_.vocab; off += block_) {
      const int64_t n = std::min(block_, a_.vocab - off);
      const acc_t* s = kNeedLogits ? student(off, n) : nullptr;
      const BlockFrame<acc_t> fr = frame(off, cd, delta);
      acc_t* gs = a_.grad_student ? grad_target<acc_t>(a_.grad_student, a_.student_dtype, g_base_ + off, gsbuf_)
                                  : gsbuf_;
      if (want_teacher) {
        acc_t* gt = grad_target<acc_t>(a_.grad_teacher, a_.teacher_dtype, g_base_ + off, gtbuf_);
        divergence_grad_block<acc_t, kHard, kPowT, true>(s, exp_t_.data() + off, exp_s_.data() + off,
                                                         qg_.data() + off, ph_.data() + off, n, fr, c,
                                                         acc_t(sums.qg), acc_t(sums.ph), gs, gt);
        store_block<acc_t>(a_.grad_teacher, a_.teacher_dtype, g_base_ + off, n, gt);
      } else {
        divergence_grad_block<acc_t, kHard, kPowT, false>(s, exp_t_.data() + off, exp_s_.data() + off,
                                                          qg_.data() + off, ph_.data() + off, n, fr, c,
                                                          acc_t(sums.qg), acc_t(sums.ph), gs, nullptr);
      }
      finish_student_block(gs, off, n, y, c);
    }
    return sums.f;
  }

  const RowsArgs& a_;
  acc_t* sbuf_;
  acc_t* tbuf_;
  acc_t* gsbuf_;
  acc_t* gtbuf_;
  int64_t s_base_ = 0, t_base_ = 0, g_base_ = 0;  // the current row's offsets
  const int64_t block_;                            // elements per block (kBlock, or smaller in tests)
  // Pass 1's exps of the current row (in L2 for the gradient pass) and the shifts of each block;
  // qg and ph of a divergence other than forward KL between its passes 2 and 3.
  std::vector<acc_t> exp_t_;
  std::vector<acc_t> exp_s_;
  std::vector<acc_t> qg_;
  std::vector<acc_t> ph_;
  std::vector<BlockShift> shifts_;
};

template <class acc_t, bool kSoft, bool kHard, int kPowT>
void run_rows(const RowsArgs& a) {
  // Enough rows per task that a task streams ~256K elements.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<Scratch>();
    RowWorker<acc_t, kSoft, kHard, kPowT> worker(a, *scratch);
    for (int64_t row = begin; row < end; ++row) worker.run(row);
  });
}

template <class acc_t, bool kHard>
void run_rows_for_temperature(const RowsArgs& a) {
  switch (a.params.integer_temperature) {
    case 1: return run_rows<acc_t, true, kHard, 1>(a);
    case 2: return run_rows<acc_t, true, kHard, 2>(a);
    case 4: return run_rows<acc_t, true, kHard, 4>(a);
    default: return run_rows<acc_t, true, kHard, 0>(a);
  }
}

template <class acc_t>
void run_rows_for_flags(const RowsArgs& a) {
  // The KL term is always computed (LossParams::has_soft); the hard term when there is a target.
  if (a.params.has_hard) {
    run_rows_for_temperature<acc_t, true>(a);
  } else {
    run_rows_for_temperature<acc_t, false>(a);
  }
}

}  // namespace
}  // namespace FASTKD_ISA

void FASTKD_CAT(distill_rows_, FASTKD_ISA)(const RowsArgs& args) {
  if (args.student_dtype == c10::ScalarType::Double) {
    run_rows_for_flags<double>(args);
  } else {
    run_rows_for_flags<float>(args);
  }
}

}  // namespace fastkd::cpu
