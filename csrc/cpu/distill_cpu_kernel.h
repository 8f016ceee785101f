// Entry points of the CPU kernel, one per ISA build of distill_cpu_kernel.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "divergence_row.h"

namespace fastkd::cpu {

// One call's worth of rows, already validated. Logits are (rows, vocab) with unit stride along the
// vocabulary and any row stride (a vocabulary slice of wider logits is read in place); float64 logits
// come as float64 pairs, every other pair is any mix of float32 / bfloat16 / float16. Gradients are
// written contiguous.
struct RowsArgs {
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  c10::ScalarType student_dtype = c10::ScalarType::Float;
  c10::ScalarType teacher_dtype = c10::ScalarType::Float;
  const int64_t* target = nullptr;  // null when there is no hard term and no mask
  int64_t ignore_index = -100;
  // Rows whose soft term counts (S). Null: the rows with a target, or every row without targets.
  const bool* soft_mask = nullptr;
  DivergenceParams divergence;
  int64_t rows = 0;
  int64_t vocab = 0;
  // Elements per block of a row (0: the kernel's own, 1024). Tests set a few elements through
  // FASTKD_CPU_BLOCK so that a short row is gathered in many partial blocks and every merge runs.
  int64_t block_size = 0;
  LossParams params;
  void* grad_student = nullptr;     // null: no student gradient wanted
  void* grad_teacher = nullptr;     // null: no teacher gradient wanted
  double* row_loss = nullptr;       // per row, length rows
  double* row_soft = nullptr;
  double* row_hard = nullptr;
};

void distill_rows_DEFAULT(const RowsArgs& args);
void distill_rows_AVX2(const RowsArgs& args);
void distill_rows_AVX512(const RowsArgs& args);

}  // namespace fastkd::cpu
