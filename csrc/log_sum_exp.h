// The running log-sum-exp every kernel gathers its softmax statistics with: per element, per thread,
// and merged across threads in a fixed order. One definition for the CPU and CUDA kernels, so the CPU
// suite runs the code the GPU runs (tests/rows_row_check.cpp, the sparse CPU kernel).
#pragma once

#include <cmath>
#include <limits>

#include "distill_row.h"  // FASTKD_HD, FASTKD_ISA

namespace fastkd {
inline namespace FASTKD_ISA {

// log sum_i exp(k x_i) (k > 0) of values added one at a time or merged in any grouping (blocks of
// threads): m = max_i x_i, s = sum_i exp(k (x_i - m)). Empty or all -inf: -inf; any NaN: NaN.
template <class F>
struct LogSumExp {
  F m = -std::numeric_limits<F>::infinity();
  F s = 0;

  FASTKD_HD void add(F x, F k) {
    if (m != m) return;
    if (x != x) {
      m = s = x;
    } else if (x > m) {
      s = (m == -std::numeric_limits<F>::infinity() ? F(0) : s * std::exp(k * (m - x))) + F(1);
      m = x;
    } else if (x != -std::numeric_limits<F>::infinity()) {
      s += std::exp(k * (x - m));
    }
  }

  FASTKD_HD void merge(const LogSumExp& o, F k) {
    if (m != m || o.m == -std::numeric_limits<F>::infinity()) return;
    if (o.m != o.m) {
      *this = o;
    } else if (o.m > m) {
      s = (m == -std::numeric_limits<F>::infinity() ? F(0) : s * std::exp(k * (m - o.m))) + o.s;
      m = o.m;
    } else {
      s += o.s * std::exp(k * (o.m - m));
    }
  }

  // Raises m to x (rescaling s) without adding x: for loops that sum exp(k (x_i - m)) themselves
  // against m (ExpSum) and add the total with add_sum(). A NaN x makes the sum NaN.
  FASTKD_HD void raise_to(F x, F k) {
    if (m != m) return;
    if (x != x) {
      m = s = x;
    } else if (x > m) {
      s = m == -std::numeric_limits<F>::infinity() ? F(0) : s * std::exp(k * (m - x));
      m = x;
    }
  }
  FASTKD_HD void add_sum(F partial) { s += partial; }

  // log sum_i exp(k (x_i - shift)); a shift near the maximum keeps large logits' digits.
  FASTKD_HD F shifted(F shift, F k) const {
    if (m != m || m == -std::numeric_limits<F>::infinity() || m == std::numeric_limits<F>::infinity()) return m;
    return k * (m - shift) + std::log(s);
  }
  FASTKD_HD F value(F k) const { return shifted(F(0), k); }
};


// Elements a thread sums in acc_t before adding into fp64 (the CPU kernel's flush length too).
constexpr int kFlushElements = 16;

// A sum of acc_t values (a thread's elements) folded into fp64 every kFlush values: the element
// arithmetic at acc_t's rate, the row's total with fp64's digits.
template <class acc_t, int kFlush = kFlushElements>
struct FlushedSum {
  double sum = 0;
  acc_t part = 0;
  int count = 0;

  FASTKD_HD void add(acc_t x) {
    part += x;
    if (++count == kFlush) flush();
  }
  FASTKD_HD void flush() {
    sum += double(part);
    part = acc_t(0);
    count = 0;
  }
  FASTKD_HD double total() {
    flush();
    return sum;
  }
};

// Sums exp(k (x - m)) of a thread's elements in acc_t (float for float / bfloat16 / float16 logits:
// the exps at full rate on every GPU), against the running maximum m of an fp64 LogSumExp; the partial
// sum goes into the fp64 sum every kFlush elements and whenever the maximum rises (rarely, after the
// first few elements). -inf elements add 0, a NaN makes the sum NaN, and so does +inf (exp(inf - inf),
// as in a softmax over it). `Math` supplies exp in acc_t.
template <class acc_t, class Math, int kFlush = kFlushElements>
struct ExpSum {
  LogSumExp<double> lse;
  acc_t top = -std::numeric_limits<acc_t>::infinity();  // lse.m in acc_t (exact: it is an element)
  acc_t shift = 0;  // top, or 0 while every element is -inf (exp(-inf - 0) = 0 keeps the sum exact)
  acc_t part = 0;
  int count = 0;

  FASTKD_HD void add(acc_t x, acc_t k) {
    if (!(x <= top)) {  // a new maximum, or NaN
      flush();
      lse.raise_to(double(x), double(k));
      top = acc_t(lse.m);
      shift = lse.m == -std::numeric_limits<double>::infinity() ? acc_t(0) : top;
    }
    part += Math::exp((x - shift) * k);
    if (++count == kFlush) flush();
  }
  FASTKD_HD void flush() {
    lse.add_sum(double(part));
    part = acc_t(0);
    count = 0;
  }
  // The fp64 statistics of every element added.
  FASTKD_HD LogSumExp<double> total() {
    flush();
    return lse;
  }
};

}  // namespace FASTKD_ISA
}  // namespace fastkd
