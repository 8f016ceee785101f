// Host check of distill_row.h's exp2 form, the arithmetic of the CUDA kernels, against a long double
// reference: rows gathered both ways the kernels do (maxima first, as the resident kernel; online in
// chunks by three "threads" then merged, as the streaming kernel), in float and double, over
// temperatures, alphas, label smoothing, -inf teacher entries and large logits. CI has no GPU: this
// is what keeps the formulas the kernels share with finalize() honest there (tests/test_exp2_form.py).
// Prints each failing case; exit status 1 if any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "distill_row.h"

using namespace fastkd;

template <class acc_t>
struct HostMath {
  static acc_t exp2(acc_t x) { return std::exp2(x); }
  static acc_t expm1(acc_t x) { return std::expm1(x); }
};

struct Case {
  int vocab;
  double temperature, alpha, eps, scale;
  bool neg_inf, online;
  // Online gathering: `threads` partials, each taking `chunk` logits a step (strided), merged
  // pairwise onto the larger maxima (as partial rows are merged), or with row_max_first all moved
  // onto the row's maxima and then added (the stream kernel's block merge).
  int threads = 3, chunk = 5;
  bool row_max_first = false;
};

struct Result {
  long double loss = 0;
  std::vector<long double> gs, gt;
};

Result reference(const std::vector<double>& s, const std::vector<double>& t, int y, const Case& k) {
  const int V = int(s.size());
  const long double T = k.temperature;
  long double mt = -INFINITY, ms = -INFINITY;
  for (int j = 0; j < V; ++j) {
    mt = std::max<long double>(mt, t[j]);
    ms = std::max<long double>(ms, s[j]);
  }
  long double st = 0, sb = 0, s1 = 0, ss = 0;
  for (int j = 0; j < V; ++j) {
    st += expl((t[j] - mt) / T);
    sb += expl((s[j] - ms) / T);
    s1 += expl(s[j] - ms);
    ss += s[j];
  }
  const long double la = mt / T + logl(st), lb = ms / T + logl(sb), l1 = ms + logl(s1);
  long double kl = 0;
  std::vector<long double> p(V), q(V), r(V);
  for (int j = 0; j < V; ++j) {
    p[j] = expl((t[j] - mt) / T) / st;
    q[j] = expl((s[j] - ms) / T) / sb;
    r[j] = expl(s[j] - ms) / s1;
    if (p[j] > 0) kl += p[j] * ((t[j] / T - la) - (s[j] / T - lb));
  }
  const long double hard = (1 - k.eps) * (l1 - s[y]) + (k.eps > 0 ? k.eps * (l1 - ss / V) : 0);
  const long double c = T * T;
  Result out;
  out.loss = k.alpha * c * kl + (1 - k.alpha) * hard;
  out.gs.resize(V);
  out.gt.resize(V);
  for (int j = 0; j < V; ++j) {
    out.gs[j] = k.alpha * c / T * (q[j] - p[j]) + (1 - k.alpha) * (r[j] - (1 - k.eps) * (j == y) - k.eps / V);
    out.gt[j] = p[j] > 0 ? k.alpha * c / T * p[j] * (((t[j] / T - la) - (s[j] / T - lb)) - kl) : 0;
  }
  return out;
}

template <class acc_t, int kTMode>
Result exp2_form(const std::vector<double>& sd, const std::vector<double>& td, int y, const Case& k,
                 const LossParams& p) {
  using M = HostMath<acc_t>;
  const int V = int(sd.size());
  const std::vector<acc_t> s(sd.begin(), sd.end()), t(td.begin(), td.end());
  acc_t mt = neg_inf<acc_t>(), ms = neg_inf<acc_t>();
  Exp2Sums<acc_t> x;
  Exp2Shifts<acc_t> sh;
  if (!k.online) {
    for (int j = 0; j < V; ++j) {
      mt = std::fmax(mt, t[j]);
      ms = std::fmax(ms, s[j]);
    }
    sh = exp2_shifts<kTMode>(mt, ms, p);
    constexpr int kLanes = 32;  // each thread sums a strided share, then the shares are added
    Exp2Sums<acc_t> lanes[kLanes];
    for (int j = 0; j < V; ++j) exp2_accumulate<M, true, true, kTMode>(lanes[j % kLanes], s[j], t[j], sh);
    for (const Exp2Sums<acc_t>& lane : lanes) x.add(lane);
  } else {
    const int kThreads = k.threads, kChunk = k.chunk;
    std::vector<acc_t> part_t(kThreads), part_s(kThreads);
    std::vector<Exp2Shifts<acc_t>> part_sh(kThreads);
    std::vector<Exp2Sums<acc_t>> part_x(kThreads);
    for (int th = 0; th < kThreads; ++th) {
      acc_t tmt = neg_inf<acc_t>(), tms = neg_inf<acc_t>();
      Exp2Shifts<acc_t> tsh = exp2_shifts<kTMode>(tmt, tms, p);
      Exp2Sums<acc_t> tx;
      for (int base = th * kChunk; base < V; base += kThreads * kChunk) {
        const int end = std::min(V, base + kChunk);
        acc_t cmt = neg_inf<acc_t>(), cms = neg_inf<acc_t>();
        for (int j = base; j < end; ++j) {
          cmt = std::fmax(cmt, t[j]);
          cms = std::fmax(cms, s[j]);
        }
        if (cmt > tmt || cms > tms) {
          const Exp2Shifts<acc_t> n = exp2_shifts<kTMode>(std::fmax(tmt, cmt), std::fmax(tms, cms), p);
          exp2_move<M>(tx, tmt, tms, tsh, n);
          tsh = n;
          tmt = std::fmax(tmt, cmt);
          tms = std::fmax(tms, cms);
        }
        for (int j = base; j < end; ++j) exp2_accumulate<M, true, true, kTMode>(tx, s[j], t[j], tsh);
      }
      part_t[th] = tmt, part_s[th] = tms, part_sh[th] = tsh, part_x[th] = tx;
      if (k.row_max_first) {
        continue;
      } else if (th == 0) {
        mt = tmt, ms = tms, sh = tsh, x = tx;
      } else {  // merge as the kernel does: onto the larger maxima, then add
        const acc_t nt = std::fmax(mt, tmt), ns = std::fmax(ms, tms);
        const Exp2Shifts<acc_t> n = exp2_shifts<kTMode>(nt, ns, p);
        exp2_move<M>(x, mt, ms, sh, n);
        exp2_move<M>(tx, tmt, tms, tsh, n);
        x.add(tx);
        mt = nt, ms = ns, sh = n;
      }
    }
    if (k.row_max_first) {
      for (int th = 0; th < kThreads; ++th) {
        mt = std::fmax(mt, part_t[th]);
        ms = std::fmax(ms, part_s[th]);
      }
      sh = exp2_shifts<kTMode>(mt, ms, p);
      for (int th = 0; th < kThreads; ++th) {
        exp2_move<M>(part_x[th], part_t[th], part_s[th], part_sh[th], sh);
        x.add(part_x[th]);
      }
    }
  }
  const RowStats<double> st = exp2_row_stats<double>(x, ms, sh);
  RowCoeffs<double> c;
  RowLoss<double> loss = finalize<double>(st, double(s[y]), p, 1.0, &c);
  const Exp2Coeffs<acc_t> e = exp2_coeffs<acc_t>(x, sh, c, p);
  Result out;
  out.gs.resize(V);
  out.gt.resize(V);
  double refinement = 0;
  for (int j = 0; j < V; ++j) {
    acc_t gs = 0, gt = 0;
    exp2_element_grads<M, true, true, kTMode, true>(s[j], t[j], e, gs, gt);
    if (j == y) gs -= e.target_coef;
    out.gs[j] = gs;
    out.gt[j] = gt;
    if (e.refine) refinement += exp2_refinement_term<M>(s[j], t[j], e);
  }
  if (e.refine) refine_soft(loss, refinement, p);
  out.loss = loss.loss;
  return out;
}

// The CPU tests' tolerances (tests/conftest.py) for fp32, plus the rounding of the gradient's O(1)
// terms (soft_coef q, hard_coef r ~ alpha T and 1 - alpha) for rows whose true gradient is ~0; fp64
// far tighter.
template <class acc_t>
LossParams params_of(const Case& k) {
  LossParams p;
  p.inv_temperature = 1.0 / k.temperature;
  p.hard_weight = 1 - k.alpha;
  p.soft_weight = k.alpha * k.temperature * k.temperature;
  p.label_smoothing = k.eps;
  p.vocab = k.vocab;
  p.integer_temperature = (k.temperature == 1.0 || k.temperature == 2.0 || k.temperature == 4.0) ? int(k.temperature) : 0;
  p.element_epsilon = sizeof(acc_t) == 8 ? 1.2e-16 : 6e-8;
  return p;
}

template <class acc_t>
Result run_exp2_form(const std::vector<double>& s, const std::vector<double>& t, int y, const Case& k) {
  const LossParams p = params_of<acc_t>(k);
  switch (p.integer_temperature) {
    case 1: return exp2_form<acc_t, 1>(s, t, y, k, p);
    case 2: return exp2_form<acc_t, 2>(s, t, y, k, p);
    case 4: return exp2_form<acc_t, 4>(s, t, y, k, p);
    default: return exp2_form<acc_t, 0>(s, t, y, k, p);
  }
}

template <class acc_t>
bool check_row(const Case& k, const std::vector<double>& s, const std::vector<double>& t) {
  const int V = k.vocab;
  const int y = V / 2;
  const Result want = reference(s, t, y, k);
  const Result got = run_exp2_form<acc_t>(s, t, y, k);
  double max_d = 0, peak = 0;
  for (int j = 0; j < V; ++j) {
    if (std::isfinite(t[j] - s[j])) max_d = std::max(max_d, std::fabs(t[j] - s[j]) / k.temperature);
    peak = std::max({peak, double(std::fabs(want.gs[j])), double(std::fabs(want.gt[j]))});
  }
  const bool fp64 = sizeof(acc_t) == 8;
  const double loss_tol = fp64 ? 1e-9 * (1 + std::fabs(double(want.loss)))
                               : 1e-5 * std::fabs(double(want.loss)) + 1e-7 +
                                     1.2e-7 * max_d * std::max(k.alpha * k.temperature * k.temperature, 1.0);
  const double grad_tol = fp64 ? 1e-10 * std::max(peak, 1e-2)
                               : 5e-6 * std::max(peak, 1e-2) +
                                     2.4e-7 * max_d * k.alpha * std::max(k.temperature, 1.0 / k.temperature) +
                                     2.4e-7 * (1 + k.alpha * std::max(k.temperature, 1.0));
  const double loss_err = std::fabs(double(got.loss - want.loss));
  double grad_err = 0;
  for (int j = 0; j < V; ++j) {
    grad_err = std::max({grad_err, double(std::fabs(got.gs[j] - want.gs[j])), double(std::fabs(got.gt[j] - want.gt[j]))});
    if (std::isnan(double(got.gs[j])) || std::isnan(double(got.gt[j]))) grad_err = INFINITY;
  }
  const bool ok = loss_err <= loss_tol && grad_err <= grad_tol;
  if (!ok) {
    std::printf("%s V=%d T=%g alpha=%g eps=%g scale=%g neg_inf=%d online=%d (%dx%d%s): loss err %.3g (tol %.3g), grad err %.3g (tol %.3g)\n",
                fp64 ? "double" : "float", V, k.temperature, k.alpha, k.eps, k.scale, int(k.neg_inf), int(k.online),
                k.threads, k.chunk, k.row_max_first ? ", row max first" : "", loss_err, loss_tol, grad_err, grad_tol);
  }
  return ok;
}

template <class acc_t>
bool check(const Case& k, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0, 1);
  const int V = k.vocab;
  std::vector<double> s(V), t(V);
  for (int j = 0; j < V; ++j) {
    s[j] = acc_t(normal(gen) * k.scale);
    t[j] = acc_t(normal(gen) * k.scale + 0.3 * s[j]);
  }
  if (k.neg_inf) {
    for (int j = 1; j < V; j += 3) t[j] = -INFINITY;
  }
  return check_row<acc_t>(k, s, t);
}

// Rows whose partials see only -inf, only NaN, or nothing, merged in both orders the kernels use.
// A NaN logit anywhere must give a NaN loss; a -inf student logit under a finite teacher one +inf
// (also where 2^u underflows at small T); -inf teacher and student logits alone a finite loss.
template <class acc_t>
int check_special_rows() {
  struct Split {
    int threads, chunk;
    bool row_max_first;
  };
  const Split splits[] = {{3, 5, false}, {3, 5, true}, {4, 1, false}, {4, 1, true},
                          {8, 2, true},  {16, 1, true}, {16, 1, false}};
  const int V = 10, y = V / 2;
  int failures = 0;
  auto expect = [&](const Case& k, const char* what, long double loss, bool ok) {
    if (!ok) {
      std::printf("%s V=%d T=%g alpha=%g %dx%d%s, %s: loss %Lg\n", sizeof(acc_t) == 8 ? "double" : "float", V,
                  k.temperature, k.alpha, k.threads, k.chunk, k.row_max_first ? " row max first" : "", what, loss);
      ++failures;
    }
  };
  for (double T : {0.05, 0.5, 1.0, 2.0, 3.7, 4.0, 100.0}) {
    for (double alpha : {0.0, 0.5, 1.0}) {
      for (const Split& sp : splits) {
        Case k{V, T, alpha, 0.0, 1.0, false, true};
        k.threads = sp.threads, k.chunk = sp.chunk, k.row_max_first = sp.row_max_first;
        std::vector<double> s(V), t(V);
        for (int j = 0; j < V; ++j) {
          s[j] = acc_t(0.37 * j - 1.1 + 0.05 * (j % 3));
          t[j] = acc_t(1.3 - 0.29 * j + 0.1 * (j % 4));
        }
        for (int j = 0; j < V; ++j) {  // one NaN, in the student or the teacher row
          for (int which = 0; which < 2; ++which) {
            std::vector<double> s2 = s, t2 = t;
            (which == 0 ? s2 : t2)[j] = NAN;
            if (which == 1 && alpha == 0.0) continue;  // the teacher is not read
            const long double loss = run_exp2_form<acc_t>(s2, t2, y, k).loss;
            expect(k, which == 0 ? "NaN student logit" : "NaN teacher logit", loss, std::isnan(loss));
          }
        }
        if (alpha > 0.0) {  // a -inf student logit under the teacher's smallest one, p > 0
          std::vector<double> s2 = s, t2 = t;
          s2[V - 1] = -INFINITY;
          t2[V - 1] = acc_t(t[0] - 30.0);
          const long double loss = run_exp2_form<acc_t>(s2, t2, y, k).loss;
          expect(k, "-inf student under finite teacher", loss, loss == INFINITY);
        }
        {  // partials that see only -inf teacher logits, and only -inf logits of both rows
          std::vector<double> s2 = s, t2 = t;
          for (int j = 0; j < V; ++j) {
            if (j != 0 && j != y) t2[j] = -INFINITY;
            if (j >= 6) s2[j] = -INFINITY;
          }
          failures += !check_row<acc_t>(k, s2, t2);
        }
        failures += !check_row<acc_t>(k, s, t);  // partials that see nothing (16 threads)
      }
    }
  }
  return failures;
}

int main() {
  int failures = 0, cases = 0;
  for (int V : {2, 7, 100, 1031}) {
    for (double T : {0.05, 0.5, 1.0, 2.0, 3.7, 4.0, 100.0}) {
      for (double alpha : {0.0, 0.5, 1.0}) {
        for (double scale : {1.0, 10.0}) {
          for (int flags = 0; flags < 8; ++flags) {
            const Case k{V, T, alpha, (flags & 1) ? 0.1 : 0.0, scale, bool(flags & 2), bool(flags & 4)};
            const unsigned seed = unsigned(V * 131 + T * 7 + alpha * 3 + flags);
            failures += !check<float>(k, seed);
            failures += !check<double>(k, seed);
            cases += 2;
          }
        }
      }
    }
  }
  const int special = check_special_rows<float>() + check_special_rows<double>();
  std::printf("%d of %d cases within tolerance; %d failures among the -inf / NaN / empty-partial rows\n",
              cases - failures, cases, special);
  failures += special;
  return failures == 0 ? 0 : 1;
}
