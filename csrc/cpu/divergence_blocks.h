// The passes of a divergence other than forward KL over one block of a row (divergence_row.h):
// pass 2 gathers the element terms' row sums and keeps qg (and ph, which only the teacher gradient
// reads: kKeepPh); pass 3 writes the gradients. Pass 1 (the softmax statistics and exps) is the
// forward-KL kernel's accumulate_block.
// Include inside the ISA namespace of distill_cpu_kernel.cpp, after its helpers.
#pragma once

// The three row sums of divergence_row.h, in fp64.
struct DivergenceSums {
  double f = 0, qg = 0, ph = 0;
};

// What pass 2 needs of a finished pass 1 for one block: p = exp_t * p_scale, q = exp_s * q_scale,
// and d = log p - log q = (t - s) / T - delta with delta = lse(t / T) - lse(s / T).
template <class acc_t>
struct BlockFrame {
  acc_t q_scale, p_scale, inv_t, delta, beta, one_minus_beta;
};

template <Divergence kKind, class acc_t, bool kKeepPh>
void divergence_sums_block(const acc_t* s, const acc_t* t, const acc_t* exp_t, const acc_t* exp_s, int64_t n,
                           const BlockFrame<acc_t>& fr, acc_t* qg_out, acc_t* ph_out, DivergenceSums& sums) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  const V vq(fr.q_scale), vp(fr.p_scale), vinv_t(fr.inv_t), vdelta(fr.delta), vbeta(fr.beta),
      vobeta(fr.one_minus_beta);
  for (int64_t start = 0; start < n_vec; start += kFlush * kW) {
    const int64_t stop = std::min(n_vec, start + kFlush * kW);
    V f(acc_t(0)), qg(acc_t(0)), ph(acc_t(0));
    for (int64_t i = start; i < stop; i += kW) {
      const V q = V::loadu(exp_s + i) * vq;
      const V p = V::loadu(exp_t + i) * vp;
      const V d = (V::loadu(t + i) - V::loadu(s + i)) * vinv_t - vdelta;
      const ElementTerms<V> e = divergence_terms<kKind, VecMath<acc_t>>(p, q, d, vbeta, vobeta);
      f = f + e.f;
      qg = qg + e.qg;
      ph = ph + e.ph;
      e.qg.store(qg_out + i);
      if constexpr (kKeepPh) e.ph.store(ph_out + i);
    }
    sums.f += horizontal_sum(f);
    sums.qg += horizontal_sum(qg);
    sums.ph += horizontal_sum(ph);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t q = exp_s[i] * fr.q_scale;
    const acc_t p = exp_t[i] * fr.p_scale;
    const acc_t d = (t[i] - s[i]) * fr.inv_t - fr.delta;
    const ElementTerms<acc_t> e =
        divergence_terms<kKind, ScalarMath<acc_t>>(p, q, d, fr.beta, fr.one_minus_beta);
    sums.f += double(e.f);
    sums.qg += double(e.qg);
    sums.ph += double(e.ph);
    qg_out[i] = e.qg;
    if constexpr (kKeepPh) ph_out[i] = e.ph;
  }
}

// Pass 3: dD/ds = soft_coef (qg - q sum qg) plus the hard term's share, dD/dt = soft_coef (ph - p sum ph).
template <class acc_t, bool kHard, int kPowT, bool kTeacher>
void divergence_grad_block(const acc_t* s, const acc_t* exp_t, const acc_t* exp_s, const acc_t* qg,
                           const acc_t* ph, int64_t n, const BlockFrame<acc_t>& fr, const RowCoeffs<acc_t>& c,
                           acc_t qg_sum, acc_t ph_sum, acc_t* gs, acc_t* gt) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  const int64_t n_vec = n - n % kW;
  const V vq(fr.q_scale), vp(fr.p_scale), vcoef(c.soft_coef), vqg_sum(qg_sum), vph_sum(ph_sum);
  for (int64_t i = 0; i < n_vec; i += kW) {
    const V q = V::loadu(exp_s + i) * vq;
    V g = vcoef * (V::loadu(qg + i) - q * vqg_sum);
    if constexpr (kHard) {
      const V sv = kPowT == 0 ? V::loadu(s + i) : V(acc_t(0));
      g = g + element_hard_grad<VecMath<acc_t>, kPowT>(sv, q, c);
    }
    g.store(gs + i);
    if constexpr (kTeacher) {
      const V p = V::loadu(exp_t + i) * vp;
      (vcoef * (V::loadu(ph + i) - p * vph_sum)).store(gt + i);
    }
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t q = exp_s[i] * fr.q_scale;
    acc_t g = c.soft_coef * (qg[i] - q * qg_sum);
    if constexpr (kHard) g += element_hard_grad<ScalarMath<acc_t>, kPowT>(kPowT == 0 ? s[i] : acc_t(0), q, c);
    gs[i] = g;
    if constexpr (kTeacher) gt[i] = c.soft_coef * (ph[i] - exp_t[i] * fr.p_scale * ph_sum);
  }
}
