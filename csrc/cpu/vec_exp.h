// A vector exp (and expm1) for the CPU kernel, inlined into its loops (torch's Vectorized<float>::exp() is an
// out-of-line Sleef call, which costs more than the rest of an element's work).
//
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for exactness),
// exp(r) by the classic Cephes degree-7 polynomial: within ~1 ulp in float32 on |r| <= ln(2)/2.
// Inputs below ln(FLT_MIN) give 0 (so exp(-inf) == 0 exactly), NaN stays NaN. The kernel only
// calls it with x <= 0 (everything is max-shifted), so overflow handling is a clamp.
// expm1 reuses the same reduction: exp(r) - 1 = r + r^2 P(r) with no cancellation when n == 0
// (|x| < ln(2)/2), and 2^n exp(r) - 1 otherwise, where the subtraction loses nothing material.
// The mixtures of divergence_row.h take exp and expm1 of one clamped log-ratio from one reduction
// (fast_exp_expm1) and the log of the mixture ratio u = 1 + y from u and y (fast_log1p, Cephes' log
// polynomial on y itself near u = 1, so no division); both skip the range handling their arguments
// never need.
// Include inside the ISA namespace of the including translation unit.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <limits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace vec_exp_detail {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kMinArg = -87.3365478515625f;  // ln(FLT_MIN): below, the result is a denormal or 0
constexpr float kMaxArg = 88.3762626647949f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;
// log: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f), f = m - 1 (the Cephes
// single-precision minimax polynomial, ~1 ulp).
constexpr float kSqrtHalf = 0.707106781186547524f;
constexpr float kSqrt2 = 1.41421356237309505f;
constexpr float kL[9] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                         -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f};
}  // namespace vec_exp_detail

#if defined(CPU_CAPABILITY_AVX512)
// x = n ln 2 + r; pm1 = exp(r) - 1 without cancellation. No range handling: NaN stays NaN in pm1.
inline void exp_reduce(__m512 x, __m512& n, __m512& pm1) {
  using namespace vec_exp_detail;
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  pm1 = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
}

// exp(x) = two_n * (1 + pm1), x clamped to the float range first.
inline void exp_parts(__m512 x_in, __m512& two_n, __m512& pm1, __m512& n) {
  using namespace vec_exp_detail;
  const __m512 x = _mm512_min_ps(_mm512_max_ps(x_in, _mm512_set1_ps(kMinArg)), _mm512_set1_ps(kMaxArg));
  exp_reduce(x, n, pm1);
  two_n = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}

inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& xv) {
  const __m512 x_in = xv;
  __m512 two_n, pm1, n;
  exp_parts(x_in, two_n, pm1, n);
  __m512 y = _mm512_fmadd_ps(pm1, two_n, two_n);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x_in, _mm512_set1_ps(vec_exp_detail::kMinArg), _CMP_LT_OQ), y,
                           _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x_in, x_in, _CMP_UNORD_Q), y, x_in);
}

inline at::vec::Vectorized<float> fast_expm1(const at::vec::Vectorized<float>& xv) {
  const __m512 x_in = xv;
  __m512 two_n, pm1, n;
  exp_parts(x_in, two_n, pm1, n);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 y = _mm512_sub_ps(_mm512_fmadd_ps(pm1, two_n, two_n), one);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_EQ_OQ), y, pm1);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x_in, _mm512_set1_ps(vec_exp_detail::kMinArg), _CMP_LT_OQ), y,
                           _mm512_set1_ps(-1.0f));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x_in, x_in, _CMP_UNORD_Q), y, x_in);
}

// exp(x) and expm1(x) from one reduction, for |x| <= 80 (2^n stays a normal number) or NaN.
inline void fast_exp_expm1(const at::vec::Vectorized<float>& xv, at::vec::Vectorized<float>& e,
                           at::vec::Vectorized<float>& em1) {
  __m512 n, pm1;
  exp_reduce(xv, n, pm1);
  const __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
  const __m512 ev = _mm512_fmadd_ps(pm1, two_n, two_n);
  e = ev;
  em1 = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_EQ_OQ),
                             _mm512_sub_ps(ev, _mm512_set1_ps(1.0f)), pm1);
}

// log(u) for u = 1 + y rounded, y exact, u > 0 and finite (NaN stays NaN). u = m 2^k with m in
// [sqrt(1/2), sqrt(2)); log(m) = f - f^2/2 + f^3 P(f), f = m - 1, and where k == 0 f is y itself, so
// log1p keeps y's low bits near u = 1.
inline at::vec::Vectorized<float> fast_log1p(const at::vec::Vectorized<float>& uv,
                                             const at::vec::Vectorized<float>& yv) {
  using namespace vec_exp_detail;
  const __m512 u = uv;
  const __m512 k = _mm512_getexp_ps(_mm512_mul_ps(u, _mm512_set1_ps(kSqrt2)));  // floor(log2(u sqrt 2))
  __m512 f = _mm512_sub_ps(_mm512_scalef_ps(u, _mm512_sub_ps(_mm512_setzero_ps(), k)), _mm512_set1_ps(1.0f));
  f = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(k, _mm512_setzero_ps(), _CMP_EQ_OQ), f, yv);
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(kL[0]);
  for (int i = 1; i < 9; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kL[i]));
  p = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  p = _mm512_fmadd_ps(k, _mm512_set1_ps(kLn2Lo), p);
  p = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, p);
  const __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(kLn2Hi), _mm512_add_ps(f, p));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q), r, u);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void exp_reduce(__m256 x, __m256& n, __m256& pm1) {
  using namespace vec_exp_detail;
  n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  pm1 = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
}

inline __m256 pow2(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline void exp_parts(__m256 x_in, __m256& two_n, __m256& pm1, __m256& n) {
  using namespace vec_exp_detail;
  const __m256 x = _mm256_min_ps(_mm256_max_ps(x_in, _mm256_set1_ps(kMinArg)), _mm256_set1_ps(kMaxArg));
  exp_reduce(x, n, pm1);
  two_n = pow2(n);
}

inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& xv) {
  const __m256 x_in = xv;
  __m256 two_n, pm1, n;
  exp_parts(x_in, two_n, pm1, n);
  __m256 y = _mm256_fmadd_ps(pm1, two_n, two_n);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(),
                       _mm256_cmp_ps(x_in, _mm256_set1_ps(vec_exp_detail::kMinArg), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x_in, _mm256_cmp_ps(x_in, x_in, _CMP_UNORD_Q));
}

inline at::vec::Vectorized<float> fast_expm1(const at::vec::Vectorized<float>& xv) {
  const __m256 x_in = xv;
  __m256 two_n, pm1, n;
  exp_parts(x_in, two_n, pm1, n);
  __m256 y = _mm256_sub_ps(_mm256_fmadd_ps(pm1, two_n, two_n), _mm256_set1_ps(1.0f));
  y = _mm256_blendv_ps(y, pm1, _mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_EQ_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(-1.0f),
                       _mm256_cmp_ps(x_in, _mm256_set1_ps(vec_exp_detail::kMinArg), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x_in, _mm256_cmp_ps(x_in, x_in, _CMP_UNORD_Q));
}

// As the AVX-512 fast_exp_expm1 (a NaN x leaves 2^n undefined, but pm1 NaN).
inline void fast_exp_expm1(const at::vec::Vectorized<float>& xv, at::vec::Vectorized<float>& e,
                           at::vec::Vectorized<float>& em1) {
  __m256 n, pm1;
  exp_reduce(xv, n, pm1);
  const __m256 two_n = pow2(n);
  const __m256 ev = _mm256_fmadd_ps(pm1, two_n, two_n);
  e = ev;
  em1 = _mm256_blendv_ps(_mm256_sub_ps(ev, _mm256_set1_ps(1.0f)), pm1,
                         _mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_EQ_OQ));
}

// As the AVX-512 fast_log1p, with the exponent taken from the bits.
inline at::vec::Vectorized<float> fast_log1p(const at::vec::Vectorized<float>& uv,
                                             const at::vec::Vectorized<float>& yv) {
  using namespace vec_exp_detail;
  const __m256 u = uv;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i ui = _mm256_castps_si256(u);
  __m256 k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(ui, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(ui, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  k = _mm256_sub_ps(k, _mm256_and_ps(small, one));
  __m256 f = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));
  f = _mm256_blendv_ps(f, yv, _mm256_cmp_ps(k, _mm256_setzero_ps(), _CMP_EQ_OQ));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(kL[0]);
  for (int i = 1; i < 9; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kL[i]));
  p = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  p = _mm256_fmadd_ps(k, _mm256_set1_ps(kLn2Lo), p);
  p = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, p);
  const __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(f, p));
  return _mm256_blendv_ps(r, u, _mm256_cmp_ps(u, u, _CMP_UNORD_Q));
}
#else
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) { return x.exp(); }
inline at::vec::Vectorized<float> fast_expm1(const at::vec::Vectorized<float>& x) { return x.expm1(); }
inline void fast_exp_expm1(const at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& e,
                           at::vec::Vectorized<float>& em1) {
  e = x.exp();
  em1 = x.expm1();
}
inline at::vec::Vectorized<float> fast_log1p(const at::vec::Vectorized<float>&,
                                             const at::vec::Vectorized<float>& y) {
  return y.log1p();
}
#endif

inline at::vec::Vectorized<double> fast_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }
inline at::vec::Vectorized<double> fast_expm1(const at::vec::Vectorized<double>& x) { return x.expm1(); }
inline void fast_exp_expm1(const at::vec::Vectorized<double>& x, at::vec::Vectorized<double>& e,
                           at::vec::Vectorized<double>& em1) {
  e = x.exp();
  em1 = x.expm1();
}
inline at::vec::Vectorized<double> fast_log1p(const at::vec::Vectorized<double>&,
                                              const at::vec::Vectorized<double>& y) {
  return y.log1p();
}
