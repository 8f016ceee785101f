// Entry points of the CPU kernel, one per ISA build of distill_cpu_kernel.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "distill_row.h"

namespace fastkd::cpu {

// One call's worth of rows, already validated. Logits are (rows, vocab) row-major; float64 logits
// come as float64 pairs, every other pair is any mix of float32 / bfloat16 / float16.
struct RowsArgs {
  const void* student = nullptr;
  const void* teacher = nullptr;
  c10::ScalarType student_dtype = c10::ScalarType::Float;
  c10::ScalarType teacher_dtype = c10::ScalarType::Float;
  const int64_t* target = nullptr;  // null when there is no hard term and no mask
  int64_t ignore_index = -100;
  int64_t rows = 0;
  int64_t vocab = 0;
  LossParams params;
  double grad_scale = 1.0;          // the reduction's scale, folded into the gradient
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
