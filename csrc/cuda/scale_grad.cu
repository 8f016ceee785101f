// grad *= grad_output in place (the backward of the distillation op: its gradient was computed with
// the forward and only needs the incoming scale). The usual loss.backward() passes exactly 1: every
// block reads that scalar on the device and returns at once, so there is no pass and no host sync.
#include "cuda/device_math.cuh"
#include "cuda/launch.h"

namespace fastkd::cuda {
namespace {

constexpr int kScaleThreads = 256;

template <class G>
__global__ void __launch_bounds__(kScaleThreads) scale_all_kernel(G* grad, int64_t n, const acc_of<G>* go, bool vec) {
  using acc_t = acc_of<G>;
  const acc_t s = go[0];
  if (s == acc_t(1)) return;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    constexpr int N = kVecElems<G>;
    const int64_t nvec = n / N;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      acc_t x[N];
      unpack<G>(*reinterpret_cast<const uint4*>(grad + v * N), x);
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] *= s;
      *reinterpret_cast<uint4*>(grad + v * N) = pack<G>(x);
    }
    done = nvec * N;
  }
  for (int64_t i = done + tid; i < n; i += nthreads) grad[i] = from_acc<G>(to_acc(grad[i]) * s);
}

template <class G>
__global__ void __launch_bounds__(kScaleThreads) scale_rows_kernel(G* grad, int64_t rows, int64_t cols, const acc_of<G>* go) {
  using acc_t = acc_of<G>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const acc_t s = go[r];
    if (s == acc_t(1)) continue;
    G* g = grad + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) g[c] = from_acc<G>(to_acc(g[c]) * s);
  }
}

template <class G>
void launch_typed(void* grad, int64_t rows, int64_t cols, const void* go, bool per_row, cudaStream_t stream) {
  G* g = static_cast<G*>(grad);
  const auto* s = static_cast<const acc_of<G>*>(go);
  if (per_row) {
    const int64_t blocks = rows < 65535 ? rows : 65535;
    scale_rows_kernel<G><<<unsigned(blocks), kScaleThreads, 0, stream>>>(g, rows, cols, s);
    return;
  }
  const int64_t n = rows * cols;
  const bool vec = (reinterpret_cast<uintptr_t>(grad) & 15) == 0;
  const int64_t work = vec ? n / kVecElems<G> + 1 : n;
  int64_t blocks = (work + kScaleThreads - 1) / kScaleThreads;
  blocks = blocks < 4096 ? blocks : 4096;  // grid-stride beyond that
  scale_all_kernel<G><<<unsigned(blocks), kScaleThreads, 0, stream>>>(g, n, s, vec);
}

}  // namespace

void launch_scale_grad(void* grad, DType grad_dtype, int64_t rows, int64_t cols, const void* grad_output,
                       bool per_row, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  visit_logit_type(grad_dtype, [&](auto x) {
    launch_typed<typename decltype(x)::type>(grad, rows, cols, grad_output, per_row, stream);
  });
}

}  // namespace fastkd::cuda
