// Host-side view of the vocabulary-parallel CUDA kernel (vocab_parallel_kernel.cu): plain data, so the
// ATen glue (vocab_parallel_cuda.cpp) compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"
#include "divergence_row.h"
#include "vocab_parallel_layout.h"

namespace fastkd::cuda {

enum class VpPass : int { Stats = 0, Sums = 1, Gradients = 2 };

// One call's rows of one rank's columns [vocab_start, vocab_start + vocab) of global_vocab.
struct VpKernelArgs {
  VpPass pass = VpPass::Stats;
  DType dtype = DType::Float;  // of both logits (a mixed pair is widened by the host first)
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  const int64_t* target = nullptr;  // global class indices; null: no hard term
  int64_t ignore_index = -100;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t vocab_start = 0;
  int64_t global_vocab = 0;
  double inv_temperature = 1.0;
  double label_smoothing = 0.0;
  Divergence divergence = Divergence::ForwardKL;
  double beta = 0.0;
  double one_minus_beta = 1.0;
  const double* frame = nullptr;   // device (rows, kVpFrame): sums and gradients
  const double* coeffs = nullptr;  // device (rows, kVpCoeffs): gradients
  double* out = nullptr;           // device (rows, kVpStats) or (rows, kVpSums)
  void* grad_student = nullptr;    // contiguous (rows, vocab); null: not wanted
  void* grad_teacher = nullptr;
};

void launch_vocab_parallel_kernel(const VpKernelArgs& args, cudaStream_t stream);

}  // namespace fastkd::cuda
