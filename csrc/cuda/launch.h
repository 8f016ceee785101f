// The interface between the ATen glue (distill_cuda.cpp, scale_grad_cuda.cpp, plain C++) and the
// kernels (*.cu): raw pointers, sizes and a stream, so the kernel files compile without ATen.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "distill_row.h"

namespace fastkd::cuda {

enum class DType : int { Float = 0, BFloat16 = 1, Half = 2, Double = 3 };

// Which kernel runs a call: chosen per call from the shapes and the device (see distill_dispatch.cuh);
// FASTKD_CUDA_KERNEL=stream|resident forces one (tests and benchmarks), where the resident kernel
// still falls back to streaming when the row cannot stay on chip.
enum class KernelChoice : int { Auto = 0, Stream = 1, Resident = 2 };

// What the dispatcher needs to know about the current device (read once by the glue).
struct DeviceInfo {
  int index = 0;  // the CUDA device index: per-device kernel attributes are cached under it
  int major = 0, minor = 0;
  int sm_count = 0;
  int64_t smem_per_sm = 0;         // shared memory per multiprocessor
  int64_t smem_per_block_optin = 0;  // the most one block may opt into
  bool kernel_image = true;          // this build has code (SASS, or PTX to JIT) the device can run
};

// Whether the current device can run this build's kernels (false: no SASS for its arch and no PTX
// the driver can compile for it).
bool kernel_image_available();

// One call's rows. Student and teacher have the same dtype here (the glue widens a mixed pair), unit
// stride along the vocabulary and any row stride (a vocabulary slice is read in place); the gradients
// are contiguous (rows, vocab).
struct DistillLaunch {
  DType dtype = DType::Float;
  const void* student = nullptr;
  const void* teacher = nullptr;    // unread when !params.has_soft
  int64_t student_row_stride = 0;   // elements between rows
  int64_t teacher_row_stride = 0;
  const int64_t* target = nullptr;  // null: no target (alpha == 1, no mask)
  int64_t ignore_index = -100;
  int64_t rows = 0;
  int64_t vocab = 0;
  LossParams params;
  const double* scale_device = nullptr;  // the reduction's gradient scale on the device ("mean"), or
  double scale_host = 1.0;               // this one when scale_device is null
  void* grad_student = nullptr;          // null: not wanted
  void* grad_teacher = nullptr;          // null: not wanted
  void* row_loss = nullptr;              // per row, float (double for DType::Double)
  void* row_soft = nullptr;
  void* row_hard = nullptr;
  KernelChoice choice = KernelChoice::Auto;
};

// The kernel that ran (for tests / benchmarks): "stream", "stream-warp", "resident-<k>".
struct LaunchReport {
  const char* kernel = "none";
  int cluster = 0;
};

LaunchReport launch_distill_float(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream);
LaunchReport launch_distill_bfloat16(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream);
LaunchReport launch_distill_half(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream);
LaunchReport launch_distill_double(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream);

// scale_out[0] = 1 / max(#rows with target != ignore_index, 1), computed on the device.
void launch_mean_scale(const int64_t* target, int64_t rows, int64_t ignore_index, double* scale_out,
                       cudaStream_t stream);

// out_k[0] = scale * sum_i rows_k[i] for the three per-row arrays (loss, soft, hard), in a fixed
// order (deterministic); scale = *scale_device when it is given, else scale_host.
void launch_reduce_rows(const void* row_loss, const void* row_soft, const void* row_hard, int64_t rows,
                        bool is_double, const double* scale_device, double scale_host, void* out_loss,
                        void* out_soft, void* out_hard, cudaStream_t stream);

// grad *= grad_output (a scalar, or one value per row of `cols` elements), in place; grad is
// contiguous and grad_output holds float (double for a double grad). A value of exactly 1 is skipped
// on the device: every block reads it first and returns at once.
void launch_scale_grad(void* grad, DType grad_dtype, int64_t rows, int64_t cols, const void* grad_output,
                       bool per_row, cudaStream_t stream);

}  // namespace fastkd::cuda
