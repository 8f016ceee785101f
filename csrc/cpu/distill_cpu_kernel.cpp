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

#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)

namespace fastkd::cpu {
inline namespace FASTKD_ISA {
namespace {

using at::vec::Vectorized;
constexpr int64_t kBlock = 1024;  // elements per block: 4 fp32 streams of 4 KiB stay in L1

template <class acc_t>
struct VecMath {
  using V = Vectorized<acc_t>;
  static V exp(const V& x) { return x.exp(); }
  static V zero_where_zero(const V& p, const V& x) {
    return V::blendv(x, V(acc_t(0)), p == V(acc_t(0)));
  }
};

template <class acc_t>
struct ScalarMath {
  static acc_t exp(acc_t x) { return std::exp(x); }
  static acc_t zero_where_zero(acc_t p, acc_t x) { return p == acc_t(0) ? acc_t(0) : x; }
};

template <class acc_t>
acc_t horizontal_max(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) m = nan_max(m, lanes[i]);
  return m;
}

template <class acc_t>
double horizontal_sum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) total += double(lanes[i]);
  return total;
}

// A pointer to `n` acc_t values of a row starting at `offset`: the row itself when it is already
// acc_t, else the values widened into `buf`.
template <class acc_t>
const acc_t* load_block(const void* base, c10::ScalarType dtype, int64_t offset, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return static_cast<const double*>(base) + offset;
  } else {
    switch (dtype) {
      case c10::ScalarType::BFloat16:
        at::vec::convert(static_cast<const c10::BFloat16*>(base) + offset, buf, n);
        return buf;
      case c10::ScalarType::Half:
        at::vec::convert(static_cast<const c10::Half*>(base) + offset, buf, n);
        return buf;
      default:
        return static_cast<const float*>(base) + offset;
    }
  }
}

template <class acc_t>
double load_one(const void* base, c10::ScalarType dtype, int64_t index) {
  switch (dtype) {
    case c10::ScalarType::Double: return static_cast<const double*>(base)[index];
    case c10::ScalarType::BFloat16: return float(static_cast<const c10::BFloat16*>(base)[index]);
    case c10::ScalarType::Half: return float(static_cast<const c10::Half*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

// Where the gradient of a block is computed: straight into the output when it is acc_t, else into
// `buf`, which store_block() then narrows into the output.
template <class acc_t>
acc_t* grad_target(void* base, c10::ScalarType dtype, int64_t offset, acc_t* buf) {
  if (dtype == c10::CppTypeToScalarType<acc_t>::value) return static_cast<acc_t*>(base) + offset;
  return buf;
}

template <class acc_t>
void store_block(void* base, c10::ScalarType dtype, int64_t offset, int64_t n, const acc_t* buf) {
  if constexpr (!std::is_same_v<acc_t, double>) {
    if (dtype == c10::ScalarType::BFloat16) {
      at::vec::convert(buf, static_cast<c10::BFloat16*>(base) + offset, n);
    } else if (dtype == c10::ScalarType::Half) {
      at::vec::convert(buf, static_cast<c10::Half*>(base) + offset, n);
    }
  }
}

size_t element_size(c10::ScalarType dtype) { return c10::elementSize(dtype); }

// Sums of one block relative to fixed maxima; V is Vectorized<acc_t> or acc_t (the tail).
template <class Math, bool kSoft, bool kHard, bool kUnitT, class V>
struct BlockSums {
  V sum_t, w, sum_b, sum_1, sum_s;
  explicit BlockSums(V zero) : sum_t(zero), w(zero), sum_b(zero), sum_1(zero), sum_s(zero) {}

  void add(V s, V t, V shift_t, V shift_s, V inv_t) {
    if constexpr (kSoft) {
      const V et = Math::exp((t - shift_t) * inv_t);
      sum_t = sum_t + et;
      w = w + Math::zero_where_zero(et, et * ((t - s) * inv_t));
    }
    V eb = V(0);
    if constexpr (kSoft || kUnitT) {
      eb = Math::exp((s - shift_s) * inv_t);
      sum_b = sum_b + eb;
    }
    if constexpr (kHard) {
      sum_1 = sum_1 + (kUnitT ? eb : Math::exp(s - shift_s));
      sum_s = sum_s + s;
    }
  }
};

// Pass 1 on one block: raise the running maxima to the block's, then add the block's sums.
template <class acc_t, bool kSoft, bool kHard, bool kUnitT>
void accumulate_block(RowStats<double>& st, const acc_t* s, const acc_t* t, int64_t n, double inv_t) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  const acc_t ninf = neg_inf<acc_t>();

  V max_s(ninf), max_t(ninf);
  for (int64_t i = 0; i < n_vec; i += kW) {
    max_s = at::vec::maximum(max_s, V::loadu(s + i));
    if constexpr (kSoft) max_t = at::vec::maximum(max_t, V::loadu(t + i));
  }
  acc_t block_max_s = horizontal_max(max_s);
  acc_t block_max_t = horizontal_max(max_t);
  for (int64_t i = n_vec; i < n; ++i) {
    block_max_s = nan_max(block_max_s, s[i]);
    if constexpr (kSoft) block_max_t = nan_max(block_max_t, t[i]);
  }
  st.rebase(kSoft ? nan_max(st.max_t, double(block_max_t)) : st.max_t,
            nan_max(st.max_s, double(block_max_s)), inv_t);

  // While a maximum is still -inf every value so far is -inf and exp(-inf - 0) = 0 is exact; a
  // shift of -inf would give exp(NaN).
  const acc_t shift_t = st.max_t == neg_inf<double>() ? acc_t(0) : acc_t(st.max_t);
  const acc_t shift_s = st.max_s == neg_inf<double>() ? acc_t(0) : acc_t(st.max_s);
  const acc_t inv_t_acc = acc_t(inv_t);

  BlockSums<VecMath<acc_t>, kSoft, kHard, kUnitT, V> vec_sums{V(acc_t(0))};
  const V vshift_t(shift_t), vshift_s(shift_s), vinv_t(inv_t_acc);
  for (int64_t i = 0; i < n_vec; i += kW) {
    const V sv = V::loadu(s + i);
    const V tv = kSoft ? V::loadu(t + i) : V(acc_t(0));
    vec_sums.add(sv, tv, vshift_t, vshift_s, vinv_t);
  }
  BlockSums<ScalarMath<acc_t>, kSoft, kHard, kUnitT, acc_t> tail{acc_t(0)};
  for (int64_t i = n_vec; i < n; ++i) {
    tail.add(s[i], kSoft ? t[i] : acc_t(0), shift_t, shift_s, inv_t_acc);
  }
  st.sum_t += horizontal_sum(vec_sums.sum_t) + double(tail.sum_t);
  st.w += horizontal_sum(vec_sums.w) + double(tail.w);
  st.sum_b += horizontal_sum(vec_sums.sum_b) + double(tail.sum_b);
  st.sum_1 += horizontal_sum(vec_sums.sum_1) + double(tail.sum_1);
  st.sum_s += horizontal_sum(vec_sums.sum_s) + double(tail.sum_s);
}

// Pass 2 on one block: the gradients (before the target-class correction).
template <class acc_t, bool kSoft, bool kHard, bool kUnitT, bool kTeacher>
void gradient_block(const acc_t* s, const acc_t* t, int64_t n, const RowCoeffs<acc_t>& c, acc_t* gs,
                    acc_t* gt) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  for (int64_t i = 0; i < n_vec; i += kW) {
    const V sv = V::loadu(s + i);
    const V tv = kSoft ? V::loadu(t + i) : V(acc_t(0));
    V p(acc_t(0));
    element_student_grad<VecMath<acc_t>, kSoft, kHard, kUnitT>(sv, tv, c, &p).store(gs + i);
    if constexpr (kTeacher) element_teacher_grad<VecMath<acc_t>>(sv, tv, p, c).store(gt + i);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t tv = kSoft ? t[i] : acc_t(0);
    acc_t p = 0;
    gs[i] = element_student_grad<ScalarMath<acc_t>, kSoft, kHard, kUnitT>(s[i], tv, c, &p);
    if constexpr (kTeacher) gt[i] = element_teacher_grad<ScalarMath<acc_t>>(s[i], tv, p, c);
  }
}

template <class acc_t>
RowCoeffs<acc_t> narrow(const RowCoeffs<double>& d) {
  return RowCoeffs<acc_t>{acc_t(d.max_t),     acc_t(d.max_s),     acc_t(d.inv_t),
                          acc_t(d.inv_sum_t), acc_t(d.inv_sum_b), acc_t(d.inv_sum_1),
                          acc_t(d.soft_coef), acc_t(d.hard_coef), acc_t(d.uniform),
                          acc_t(d.target_coef), acc_t(d.teacher_shift)};
}

struct alignas(64) Scratch {
  alignas(64) double s[kBlock];
  alignas(64) double t[kBlock];
  alignas(64) double gs[kBlock];
  alignas(64) double gt[kBlock];
  template <class acc_t>
  acc_t* as(double* p) { return reinterpret_cast<acc_t*>(p); }
};

template <class acc_t, bool kSoft, bool kHard, bool kUnitT>
void run_rows(const RowsArgs& a) {
  const int64_t V = a.vocab;
  const bool want_teacher = kSoft && a.grad_teacher != nullptr;
  // Enough rows per task that a task streams ~256K elements.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(V, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<Scratch>();
    acc_t* sbuf = scratch->as<acc_t>(scratch->s);
    acc_t* tbuf = scratch->as<acc_t>(scratch->t);
    acc_t* gsbuf = scratch->as<acc_t>(scratch->gs);
    acc_t* gtbuf = scratch->as<acc_t>(scratch->gt);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * V;
      const int64_t y = a.target != nullptr ? a.target[row] : -1;
      if (a.target != nullptr && y == a.ignore_index) {  // masked: loss and gradients exactly 0
        a.row_loss[row] = a.row_soft[row] = a.row_hard[row] = 0.0;
        if (a.grad_student) {
          std::memset(static_cast<char*>(a.grad_student) + base * element_size(a.student_dtype), 0,
                      V * element_size(a.student_dtype));
        }
        if (a.grad_teacher) {
          std::memset(static_cast<char*>(a.grad_teacher) + base * element_size(a.teacher_dtype), 0,
                      V * element_size(a.teacher_dtype));
        }
        continue;
      }

      RowStats<double> st;
      for (int64_t off = 0; off < V; off += kBlock) {
        const int64_t n = std::min(kBlock, V - off);
        const acc_t* s = load_block<acc_t>(a.student, a.student_dtype, base + off, n, sbuf);
        const acc_t* t = kSoft ? load_block<acc_t>(a.teacher, a.teacher_dtype, base + off, n, tbuf) : nullptr;
        accumulate_block<acc_t, kSoft, kHard, kUnitT>(st, s, t, n, a.params.inv_temperature);
      }
      const double s_target = kHard ? load_one<acc_t>(a.student, a.student_dtype, base + y) : 0.0;
      const bool want_grad = a.grad_student != nullptr || want_teacher;
      RowCoeffs<double> coeffs{};
      const RowLoss<double> loss =
          finalize<double>(st, s_target, a.params, a.grad_scale, want_grad ? &coeffs : nullptr);
      a.row_loss[row] = loss.loss;
      a.row_soft[row] = loss.soft;
      a.row_hard[row] = loss.hard;
      if (!want_grad) continue;

      const RowCoeffs<acc_t> c = narrow<acc_t>(coeffs);
      for (int64_t off = 0; off < V; off += kBlock) {
        const int64_t n = std::min(kBlock, V - off);
        const acc_t* s = load_block<acc_t>(a.student, a.student_dtype, base + off, n, sbuf);
        const acc_t* t = kSoft ? load_block<acc_t>(a.teacher, a.teacher_dtype, base + off, n, tbuf) : nullptr;
        acc_t* gs = a.grad_student ? grad_target<acc_t>(a.grad_student, a.student_dtype, base + off, gsbuf)
                                   : gsbuf;  // teacher gradient alone: the student's is scratch
        if (want_teacher) {
          acc_t* gt = grad_target<acc_t>(a.grad_teacher, a.teacher_dtype, base + off, gtbuf);
          if constexpr (kSoft) gradient_block<acc_t, kSoft, kHard, kUnitT, true>(s, t, n, c, gs, gt);
          store_block<acc_t>(a.grad_teacher, a.teacher_dtype, base + off, n, gt);
        } else {
          gradient_block<acc_t, kSoft, kHard, kUnitT, false>(s, t, n, c, gs, nullptr);
        }
        if (a.grad_student == nullptr) continue;
        if (kHard && y >= off && y < off + n) gs[y - off] -= c.target_coef;
        store_block<acc_t>(a.grad_student, a.student_dtype, base + off, n, gs);
      }
    }
  });
}

template <class acc_t>
void run_rows_for_flags(const RowsArgs& a) {
  const LossParams& p = a.params;
  if (p.has_soft && p.has_hard) {
    p.unit_temperature ? run_rows<acc_t, true, true, true>(a) : run_rows<acc_t, true, true, false>(a);
  } else if (p.has_soft) {
    p.unit_temperature ? run_rows<acc_t, true, false, true>(a) : run_rows<acc_t, true, false, false>(a);
  } else {
    // Hard term only: the b-stream is not needed, so kUnitT is off.
    run_rows<acc_t, false, true, false>(a);
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
