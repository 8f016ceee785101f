// The vector and scalar Math of distill_row.h / divergence_row.h, the block loads and stores, and
// pass 1 on one block (the softmax statistics of both sides): what every row kernel of the CPU build
// shares. Include inside the ISA namespace of a kernel source, after vec_exp.h and vec_widen.h.
#pragma once

// The Math of distill_row.h and divergence_row.h on vectors and on scalars (row tails).
template <class acc_t>
struct VecMath {
  using V = Vectorized<acc_t>;
  static V exp(const V& x) { return fast_exp(x); }
  static V expm1(const V& x) { return fast_expm1(x); }
  static void exp_expm1(const V& x, V& e, V& em1) { fast_exp_expm1(x, e, em1); }
  static V log1p(const V& u, const V& y) { return fast_log1p(u, y); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }  // propagates NaN
  static V clamp(const V& x, const V& lo, const V& hi) { return at::vec::clamp(x, lo, hi); }
  static V zero_where_zero(const V& p, const V& x) {
    return V::blendv(x, V(acc_t(0)), p == V(acc_t(0)));
  }
  static V where_zero(const V& p, const V& x) { return zero_where_zero(p, x); }
  static V where_lt(const V& x, const V& y, const V& a, const V& b) { return V::blendv(b, a, x < y); }
  static V sign(const V& x) {
    const V zero(acc_t(0));
    return V::blendv(zero, V(acc_t(1)), x > zero) - V::blendv(zero, V(acc_t(1)), x < zero);
  }
};

template <class acc_t>
struct ScalarMath {
  static acc_t exp(acc_t x) { return std::exp(x); }
  static acc_t expm1(acc_t x) { return std::expm1(x); }
  static acc_t log(acc_t x) { return std::log(x); }
  static acc_t log1p(acc_t, acc_t y) { return std::log1p(y); }
  static acc_t abs(acc_t x) { return std::fabs(x); }
  static acc_t max(acc_t a, acc_t b) { return nan_max(a, b); }
  static acc_t clamp(acc_t x, acc_t lo, acc_t hi) { return x != x ? x : std::min(std::max(x, lo), hi); }
  static acc_t zero_where_zero(acc_t p, acc_t x) { return p == acc_t(0) ? acc_t(0) : x; }
  static acc_t where_zero(acc_t p, acc_t x) { return zero_where_zero(p, x); }
  static acc_t where_lt(acc_t x, acc_t y, acc_t a, acc_t b) { return x < y ? a : b; }
  static acc_t sign(acc_t x) { return acc_t(x > acc_t(0)) - acc_t(x < acc_t(0)); }
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

// fp32 lanes sum at most kFlush vectors before they are added into fp64: at T = 100 the KL term
// is a difference of logs of sums that agree to ~1e-4, so the sums must be good to ~1e-9.
constexpr int64_t kFlush = 16;

// A pointer to `n` acc_t values of a row starting at `offset`: the row itself when it is already
// acc_t, else the values widened into `buf`.
template <class acc_t>
const acc_t* load_block(const void* base, c10::ScalarType dtype, int64_t offset, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return static_cast<const double*>(base) + offset;
  } else {
    switch (dtype) {
      case c10::ScalarType::BFloat16:
        widen(static_cast<const c10::BFloat16*>(base) + offset, buf, n);
        return buf;
      case c10::ScalarType::Half:
        widen(static_cast<const c10::Half*>(base) + offset, buf, n);
        return buf;
      default:
        return static_cast<const float*>(base) + offset;
    }
  }
}

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

void zero_row(void* base, c10::ScalarType dtype, int64_t row, int64_t vocab) {
  const size_t bytes = c10::elementSize(dtype);
  std::memset(static_cast<char*>(base) + row * vocab * bytes, 0, vocab * bytes);
}

// Sums of one stretch of a block relative to fixed maxima; V is Vectorized<acc_t> or acc_t (tails).
// kKLStats: also w and max_d, which only forward KL reads (its loss and refinement).
template <class Math, bool kSoft, bool kHard, int kPowT, bool kKLStats, class V>
struct BlockSums {
  V sum_t, w, sum_b, sum_1, sum_s, max_d;
  BlockSums(V zero, V ninf) : sum_t(zero), w(zero), sum_b(zero), sum_1(zero), sum_s(zero), max_d(ninf) {}

  // Adds one element (or vector); et / eb, the teacher's and the student's exp at T, go back to the
  // caller, which keeps them for the gradient pass.
  void add(V s, V t, V shift_t, V shift_s, V inv_t, V& et_out, V& eb_out) {
    if constexpr (kSoft) {
      const V et = Math::exp((t - shift_t) * inv_t);
      et_out = et;
      sum_t = sum_t + et;
      if constexpr (kKLStats) {
        const V d = (t - s) * inv_t;
        w = w + Math::zero_where_zero(et, et * d);
        max_d = Math::max(max_d, d);
      }
    }
    V eb = V(0);
    if constexpr (kSoft || kPowT != 0) {
      eb = Math::exp((s - shift_s) * inv_t);
      sum_b = sum_b + eb;
    }
    eb_out = eb;
    if constexpr (kHard) {
      sum_1 = sum_1 + (kPowT != 0 ? integer_power<kPowT>(eb) : Math::exp(s - shift_s));
      sum_s = sum_s + s;
    }
  }

  template <class Total>
  void add_into(Total& st, double (*reduce)(const V&)) const {
    st.sum_t += reduce(sum_t);
    st.w += reduce(w);
    st.sum_b += reduce(sum_b);
    st.sum_1 += reduce(sum_1);
    st.sum_s += reduce(sum_s);
  }
};

// The shifts a block's exps were taken against (-inf: every value so far was -inf, the exps are 0).
struct BlockShift {
  double t, s;
};

// Pass 1 on one block: raise the running maxima to the block's, then add the block's sums. The
// exps go to exp_t / exp_s, relative to the returned shifts, so the gradient pass need not redo them.
template <class acc_t, bool kSoft, bool kHard, int kPowT, bool kKLStats>
BlockShift accumulate_block(RowStats<double>& st, const acc_t* s, const acc_t* t, int64_t n, double inv_t,
                            acc_t* exp_t, acc_t* exp_s) {
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

  const V vshift_t(shift_t), vshift_s(shift_s), vinv_t(inv_t_acc);
  V max_d(ninf);
  for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
    const int64_t stop = std::min(n_vec, start + kFlush * kW);
    BlockSums<VecMath<acc_t>, kSoft, kHard, kPowT, kKLStats, V> part{V(acc_t(0)), max_d};
    for (int64_t i = start; i < stop; i += kW) {
      V et(acc_t(0)), eb(acc_t(0));
      part.add(V::loadu(s + i), kSoft ? V::loadu(t + i) : V(acc_t(0)), vshift_t, vshift_s, vinv_t, et, eb);
      et.store(exp_t + i);
      eb.store(exp_s + i);
    }
    part.add_into(st, &horizontal_sum<acc_t>);
    max_d = part.max_d;
  }
  BlockSums<ScalarMath<acc_t>, kSoft, kHard, kPowT, kKLStats, acc_t> tail{acc_t(0), horizontal_max(max_d)};
  for (int64_t i = n_vec; i < n; ++i) {
    tail.add(s[i], kSoft ? t[i] : acc_t(0), shift_t, shift_s, inv_t_acc, exp_t[i], exp_s[i]);
  }
  tail.add_into(st, +[](const acc_t& x) { return double(x); });
  st.max_d = nan_max(st.max_d, double(tail.max_d));
  return {st.max_t == neg_inf<double>() ? neg_inf<double>() : double(shift_t),
          st.max_s == neg_inf<double>() ? neg_inf<double>() : double(shift_s)};
}

// exp((shift - max) / T): moves a block's exps onto the row's final maxima.
double block_factor(double shift, double max, double inv_t) {
  return shift == neg_inf<double>() ? 0.0 : std::exp((shift - max) * inv_t);
}
