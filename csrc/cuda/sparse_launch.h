// Host-side view of the CUDA kernel of fastkd::sparse_distill_rows (sparse_kernel.cu): plain data, so
// the ATen glue (sparse_cuda.cpp) compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"
#include "sparse_row.h"

namespace fastkd::cuda {

struct SparseKernelArgs {
  DType dtype = DType::Float;  // of the student (widened to float64 by the host when the values are)
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const void* indices = nullptr;  // (rows, k) contiguous
  bool indices_int64 = true;
  const double* values = nullptr;  // (rows, k) contiguous; -inf: a padding slot
  int64_t k = 0;
  const int64_t* target = nullptr;  // null: no hard term
  int64_t ignore_index = -100;
  const bool* soft_mask = nullptr;  // null: the rows with a target (every row without targets)
  const double* weights = nullptr;  // device: (soft, hard)
  int64_t rows = 0;
  int64_t vocab = 0;
  double label_smoothing = 0.0;
  SparseRowConfig sparse;       // the divergence, the tail and 1 / T
  bool fp16_grad = false;        // float16 gradient: pre-scaled per row
  void* grad_student = nullptr;  // contiguous (rows, vocab) of dtype; null: not wanted
  double* row_loss = nullptr;    // device, length rows (float64 scratch; the host casts)
  double* row_soft = nullptr;
  double* row_hard = nullptr;
  float* grad_scale = nullptr;  // device (rows,): each row's pre-scale; null when not fp16_grad
  // One bitmap of the support per block, (blocks, sparse_support_words(vocab)), all zero; the kernel
  // leaves it zero. The grid is `blocks` blocks.
  uint32_t* support = nullptr;
  int64_t blocks = 0;
};

constexpr int64_t sparse_support_words(int64_t vocab) { return (vocab + 31) / 32; }

// The grid: as many blocks as the device holds at once (each loops over rows), at most `rows`.
int64_t sparse_grid_blocks(DType dtype, int64_t rows, int sm_count);

void launch_sparse_kernel(const SparseKernelArgs& args, cudaStream_t stream);

}  // namespace fastkd::cuda
