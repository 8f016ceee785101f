// Host-side view of the CUDA kernel of fastkd::distill_rows (rows_kernel.cu): plain data, so the ATen
// glue (rows_cuda.cpp) compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"
#include "divergence_row.h"

namespace fastkd::cuda {

struct RowsKernelArgs {
  DType dtype = DType::Float;  // of both logits (a mixed pair is widened by the host first)
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  const int64_t* target = nullptr;  // null: no hard term
  int64_t ignore_index = -100;
  const bool* soft_mask = nullptr;  // null: the rows with a target (every row without targets)
  const double* weights = nullptr;  // device: (soft, hard)
  int64_t rows = 0;
  int64_t vocab = 0;
  double inv_temperature = 1.0;
  double label_smoothing = 0.0;
  Divergence divergence = Divergence::ForwardKL;
  double beta = 0.0;
  double one_minus_beta = 1.0;
  bool fp16_student = false;  // float16 gradients: pre-scaled per row (rows_row.h, gradient_coeffs)
  bool fp16_teacher = false;
  void* grad_student = nullptr;  // contiguous (rows, vocab); null: not wanted
  void* grad_teacher = nullptr;
  double* row_loss = nullptr;  // device, length rows (float64 scratch; the host casts)
  double* row_soft = nullptr;
  double* row_hard = nullptr;
  float* grad_scale = nullptr;  // device (2, rows): each row's pre-scale, student then teacher; null: all 1
};

void launch_rows_kernel(const RowsKernelArgs& args, cudaStream_t stream);

}  // namespace fastkd::cuda
