// Entry points of the sparse-teacher CPU kernel, one per ISA build of sparse_cpu_kernel.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "sparse_row.h"

namespace fastkd::cpu {

// One call's worth of rows, already validated. The student is (rows, vocab) with unit stride along
// the vocabulary and any row stride; the teacher is (rows, k) contiguous indices (int32 or int64) and
// float64 values, a value of -inf marking a padding slot. The gradient is written contiguous.
struct SparseArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  c10::ScalarType student_dtype = c10::ScalarType::Float;  // float64 student: computed in float64
  const void* indices = nullptr;
  bool indices_int64 = true;
  const double* values = nullptr;
  int64_t k = 0;
  const int64_t* target = nullptr;  // null: no hard term
  int64_t ignore_index = -100;
  const bool* soft_mask = nullptr;  // null: the rows with a target, or every row without targets
  SparseRowConfig sparse;  // the divergence, the tail and 1 / T of the slot math
  int64_t rows = 0;
  int64_t vocab = 0;
  LossParams params;
  void* grad_student = nullptr;  // null: no gradient wanted; else (rows, vocab) of student_dtype
  double* row_loss = nullptr;
  double* row_soft = nullptr;
  double* row_hard = nullptr;
};

void sparse_rows_DEFAULT(const SparseArgs& args);
void sparse_rows_AVX2(const SparseArgs& args);
void sparse_rows_AVX512(const SparseArgs& args);

}  // namespace fastkd::cpu
