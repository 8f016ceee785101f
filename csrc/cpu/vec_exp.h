// A vector exp (and expm1) for the CPU kernel, inlined into its loops (torch's Vectorized<float>::exp() is an
// out-of-line Sleef call, which costs more than the rest of an element's work).
//
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for exactness),
// exp(r) by the classic Cephes degree-7 polynomial: within ~1 ulp in float32 on |r| <= ln(2)/2.
// Inputs below ln(FLT_MIN) give 0 (so exp(-inf) == 0 exactly), NaN stays NaN. The kernel only
// calls it with x <= 0 (everything is max-shifted), so overflow handling is a clamp.
// expm1 reuses the same reduction: exp(r) - 1 = r + r^2 P(r) with no cancellation when n == 0
// (|x| < ln(2)/2), and 2^n exp(r) - 1 otherwise, where the subtraction loses nothing material.
// Include inside the ISA namespace of the including translation unit.
#pragma once

#include <ATen/cpu/vec/vec.h>

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
}  // namespace vec_exp_detail

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) = two_n * (1 + pm1); pm1 = exp(r) - 1 without cancellation.
inline void exp_parts(__m512 x_in, __m512& two_n, __m512& pm1, __m512& n) {
  using namespace vec_exp_detail;
  const __m512 x = _mm512_min_ps(_mm512_max_ps(x_in, _mm512_set1_ps(kMinArg)), _mm512_set1_ps(kMaxArg));
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  pm1 = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
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
#elif defined(CPU_CAPABILITY_AVX2)
inline void exp_parts(__m256 x_in, __m256& two_n, __m256& pm1, __m256& n) {
  using namespace vec_exp_detail;
  const __m256 x = _mm256_min_ps(_mm256_max_ps(x_in, _mm256_set1_ps(kMinArg)), _mm256_set1_ps(kMaxArg));
  n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  pm1 = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  two_n = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
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
#else
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) { return x.exp(); }
inline at::vec::Vectorized<float> fast_expm1(const at::vec::Vectorized<float>& x) { return x.expm1(); }
#endif

inline at::vec::Vectorized<double> fast_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }
inline at::vec::Vectorized<double> fast_expm1(const at::vec::Vectorized<double>& x) { return x.expm1(); }
