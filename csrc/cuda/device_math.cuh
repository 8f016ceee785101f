// Device-side building blocks of the CUDA kernels: the Math policy of distill_row.h, 16-byte loads and
// stores of logit chunks widened to the accumulation type, and deterministic warp / block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launch.h"  // DType

namespace fastkd::cuda {

// Calls f(std::type_identity<X>{}) with X the logit type `dtype` names: the one switch from the glue's
// DType to a kernel's template (host code: the launches).
template <class F>
decltype(auto) visit_logit_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::BFloat16: return f(std::type_identity<__nv_bfloat16>{});
    case DType::Half: return f(std::type_identity<__half>{});
    case DType::Double: return f(std::type_identity<double>{});
    default: return f(std::type_identity<float>{});
  }
}

// Accumulation type of a logit type: fp32 for everything but fp64.
template <class X>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class X>
using acc_of = typename AccOf<X>::type;

// exp2 as distill_row.h's exp2 form needs it. fp32: the hardware ex2 (2 ulp; results below 2^-126
// flush to 0, which no sum or gradient can see next to the row maximum's 1).
template <class acc_t>
struct DevMath;

template <>
struct DevMath<float> {
  static __device__ __forceinline__ float exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
  static __device__ __forceinline__ float zero_where_zero(float p, float x) { return p == 0.f ? 0.f : x; }
  static __device__ __forceinline__ float expm1(float x) { return expm1f(x); }  // KL refinement rows only
};

// fp64 (gradcheck, tests): the accurate library exp2, out of line so the unrolled loops stay small
// and the file compiles in reasonable time.
__device__ __noinline__ inline double exp2_f64(double x) { return ::exp2(x); }
__device__ __noinline__ inline double expm1_f64(double x) { return ::expm1(x); }

template <>
struct DevMath<double> {
  static __device__ __forceinline__ double exp2(double x) { return exp2_f64(x); }
  static __device__ __forceinline__ double expm1(double x) { return expm1_f64(x); }
  static __device__ __forceinline__ double zero_where_zero(double p, double x) { return p == 0.0 ? 0.0 : x; }
};

// The Math of divergence_row.h on scalars, with the accurate library functions (the divergences'
// mixtures need log1p-grade accuracy near d = 0): float math for float, double for double. The
// generic rows kernel and the sparse kernel use it.
template <class acc_t>
struct ScalarDevMath {
  static __device__ __forceinline__ acc_t exp(acc_t x) { return ::exp(x); }
  static __device__ __forceinline__ acc_t expm1(acc_t x) { return ::expm1(x); }
  static __device__ __forceinline__ acc_t log(acc_t x) { return ::log(x); }
  static __device__ __forceinline__ acc_t abs(acc_t x) { return ::fabs(x); }
  static __device__ __forceinline__ acc_t clamp(acc_t x, acc_t lo, acc_t hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
  static __device__ __forceinline__ acc_t where_zero(acc_t p, acc_t x) { return p == acc_t(0) ? acc_t(0) : x; }
  static __device__ __forceinline__ acc_t where_lt(acc_t x, acc_t y, acc_t a, acc_t b) { return x < y ? a : b; }
  static __device__ __forceinline__ acc_t sign(acc_t x) { return acc_t(x > acc_t(0)) - acc_t(x < acc_t(0)); }
};

// fmax drops a NaN; the sums carry it instead (exp2(NaN) is NaN), so a NaN row still ends NaN.
template <class acc_t>
__device__ __forceinline__ acc_t dmax(acc_t a, acc_t b) {
  return ::fmax(a, b);
}
template <>
__device__ __forceinline__ float dmax<float>(float a, float b) {
  return fmaxf(a, b);
}

// ---------------------------------------------------------------- element conversions
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <class X>
__device__ __forceinline__ X from_acc(acc_of<X> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

// Elements of X in one 16-byte vector.
template <class X>
constexpr int kVecElems = int(16 / sizeof(X));

// 16 bytes of X widened to acc_t. bf16 widening is exact bit placement; fp16 goes through half2.
template <class X>
__device__ __forceinline__ void unpack(const uint4& v, acc_of<X> (&out)[kVecElems<X>]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(X) == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<X, __nv_bfloat16>) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 f = __half22float2(h);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      }
    }
  } else {
    memcpy(out, &v, 16);  // float or double: already acc_t
  }
}

template <class X>
__device__ __forceinline__ uint4 pack(const acc_of<X> (&in)[kVecElems<X>]) {
  uint4 v;
  if constexpr (sizeof(X) == 2) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<X, __nv_bfloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&w[i], &h, 4);
      } else {
        const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&w[i], &h, 4);
      }
    }
    v = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    memcpy(&v, in, 16);
  }
  return v;
}

// Loads of N elements starting at p (N == kVecElems: one aligned 16-byte access; N == 1: scalar).
// kLast: the last read of these bytes (evict first, so the lines still needed stay in L2).
template <class X, int N, bool kLast>
__device__ __forceinline__ void load_chunk(const X* p, acc_of<X> (&out)[N]) {
  if constexpr (N == kVecElems<X>) {
    const uint4 v = kLast ? __ldcs(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
    unpack<X>(v, out);
  } else {
    static_assert(N == 1, "a chunk is one 16-byte vector or one element");
    out[0] = to_acc(kLast ? __ldcs(p) : *p);
  }
}

// Streaming stores: the gradient is not read again by this kernel.
template <class X, int N>
__device__ __forceinline__ void store_chunk(X* p, const acc_of<X> (&in)[N]) {
  if constexpr (N == kVecElems<X>) {
    __stcs(reinterpret_cast<uint4*>(p), pack<X>(in));
  } else {
    static_assert(N == 1, "a chunk is one 16-byte vector or one element");
    __stcs(p, from_acc<X>(in[0]));
  }
}

// Running maximum over 16-byte chunks; 2-byte types compare packed pairs (one bf16x2 / half2 max
// per two elements, no widening). Like fmaxf, a NaN lane loses to a number.
template <class X>
struct ChunkMax {
  acc_of<X> m = -INFINITY;
  __device__ __forceinline__ void add(const uint4& v) {
    acc_of<X> x[kVecElems<X>];
    unpack<X>(v, x);
#pragma unroll
    for (int i = 0; i < kVecElems<X>; ++i) m = dmax(m, x[i]);
  }
  __device__ __forceinline__ acc_of<X> value() const { return m; }
};

template <class X2, class X>
struct PackedChunkMax {
  X2 m[2];
  __device__ __forceinline__ PackedChunkMax() {
    const X lowest = X(-INFINITY);
    m[0] = m[1] = X2(lowest, lowest);
  }
  __device__ __forceinline__ void add(const uint4& v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      X2 h;
      memcpy(&h, &w[i], 4);
      m[i & 1] = __hmax2(m[i & 1], h);
    }
  }
  __device__ __forceinline__ float value() const {
    const X2 r = __hmax2(m[0], m[1]);
    return fmaxf(float(r.x), float(r.y));
  }
};

template <>
struct ChunkMax<__nv_bfloat16> : PackedChunkMax<__nv_bfloat162, __nv_bfloat16> {};
template <>
struct ChunkMax<__half> : PackedChunkMax<__half2, __half> {};

// ---------------------------------------------------------------- reductions
// Butterfly reductions: every lane ends with the same value, combined in the same order each run.
template <class acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = dmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kMaxWarps = 32;

// Block-wide combine of K values per thread: warps first, then every thread folds the per-warp
// results in warp order from `scratch` (kMaxWarps * K values), so all threads hold the same result.
// Callers give each reduction its own scratch, so no barrier is needed after the reads.
template <bool kMax, int K, class acc_t>
__device__ __forceinline__ void block_combine(acc_t (&v)[K], acc_t* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = kMax ? warp_max(v[i]) : warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) scratch[warp * K + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = scratch[i];
  for (int w = 1; w < warps; ++w) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = kMax ? dmax(v[i], scratch[w * K + i]) : v[i] + scratch[w * K + i];
  }
}

}  // namespace fastkd::cuda
