// The reductions over rows, finished on the device so the op never waits for the host: the "mean"
// gradient scale (counted before the main kernel, which reads it) and the sums of the per-row terms.
// One block each, folded in a fixed order: the same inputs give the same bits every run.
#include "cuda/device_math.cuh"
#include "cuda/launch.h"

namespace fastkd::cuda {
namespace {

constexpr int kReduceThreads = 1024;

__global__ void __launch_bounds__(kReduceThreads) mean_scale_kernel(const int64_t* target, int64_t rows,
                                                                    int64_t ignore_index, double* scale_out) {
  __shared__ double scratch[kMaxWarps];
  double count = 0;  // exact up to 2^53 rows
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) count += target[i] != ignore_index ? 1.0 : 0.0;
  double v[1] = {count};
  block_combine<false, 1>(v, scratch);
  if (threadIdx.x == 0) scale_out[0] = 1.0 / (v[0] > 1.0 ? v[0] : 1.0);
}

template <class acc_t>
__global__ void __launch_bounds__(kReduceThreads) reduce_rows_kernel(const acc_t* loss, const acc_t* soft,
                                                                     const acc_t* hard, int64_t rows,
                                                                     const double* scale_device, double scale_host,
                                                                     acc_t* out_loss, acc_t* out_soft,
                                                                     acc_t* out_hard) {
  __shared__ double scratch[kMaxWarps * 3];
  double v[3] = {0, 0, 0};  // fp64 sums, as the CPU op
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    v[0] += double(loss[i]);
    v[1] += double(soft[i]);
    v[2] += double(hard[i]);
  }
  block_combine<false, 3>(v, scratch);
  if (threadIdx.x == 0) {
    const double scale = scale_device != nullptr ? scale_device[0] : scale_host;
    out_loss[0] = acc_t(v[0] * scale);
    out_soft[0] = acc_t(v[1] * scale);
    out_hard[0] = acc_t(v[2] * scale);
  }
}

}  // namespace

bool kernel_image_available() {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, mean_scale_kernel);
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();
  // No SASS for this GPU, and no PTX the driver will compile (too new, invalid, or JIT off / absent).
  // Any other error is left for the launch to report.
  switch (err) {
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidDeviceFunction:
    case cudaErrorInvalidKernelImage:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorInvalidPtx:
    case cudaErrorJitCompilationDisabled:
    case cudaErrorJitCompilerNotFound:
      return false;
    default:
      return true;
  }
}

void launch_mean_scale(const int64_t* target, int64_t rows, int64_t ignore_index, double* scale_out,
                       cudaStream_t stream) {
  mean_scale_kernel<<<1, kReduceThreads, 0, stream>>>(target, rows, ignore_index, scale_out);
}

void launch_reduce_rows(const void* row_loss, const void* row_soft, const void* row_hard, int64_t rows,
                        bool is_double, const double* scale_device, double scale_host, void* out_loss,
                        void* out_soft, void* out_hard, cudaStream_t stream) {
  if (is_double) {
    reduce_rows_kernel<double><<<1, kReduceThreads, 0, stream>>>(
        static_cast<const double*>(row_loss), static_cast<const double*>(row_soft),
        static_cast<const double*>(row_hard), rows, scale_device, scale_host, static_cast<double*>(out_loss),
        static_cast<double*>(out_soft), static_cast<double*>(out_hard));
  } else {
    reduce_rows_kernel<float><<<1, kReduceThreads, 0, stream>>>(
        static_cast<const float*>(row_loss), static_cast<const float*>(row_soft),
        static_cast<const float*>(row_hard), rows, scale_device, scale_host, static_cast<float*>(out_loss),
        static_cast<float*>(out_soft), static_cast<float*>(out_hard));
  }
}

}  // namespace fastkd::cuda
