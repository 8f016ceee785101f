// Entry points of the vocabulary-parallel CPU kernel, one per ISA build of vocab_parallel_cpu_kernel.cpp.
//
// A rank holds columns [vocab_start, vocab_start + vocab) of logits whose full width is global_vocab.
// The three passes of the row engine run as three calls, with the caller's collectives in between:
//   stats:     per row, the local softmax statistics (VpStats columns);
//   sums:      per row, the local sums of the divergence's f, qg, ph under the global frame (VpFrame);
//   gradients: the local columns' gradients from the global frame, the global sums and the row's
//              coefficients (VpCoeffs).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "divergence_row.h"
#include "vocab_parallel_layout.h"

namespace fastkd::cpu {

struct VpArgs {
  const void* student = nullptr;
  const void* teacher = nullptr;  // null: the student's statistics only
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  c10::ScalarType student_dtype = c10::ScalarType::Float;
  c10::ScalarType teacher_dtype = c10::ScalarType::Float;
  const int64_t* target = nullptr;  // global class indices; null: no hard term
  int64_t ignore_index = -100;
  int64_t rows = 0;
  int64_t vocab = 0;         // local columns
  int64_t vocab_start = 0;   // global index of the first local column
  int64_t global_vocab = 0;  // for label smoothing's eps / V
  double inv_temperature = 1.0;
  double label_smoothing = 0.0;
  DivergenceParams divergence;
  const double* frame = nullptr;   // (rows, kVpFrame)
  const double* coeffs = nullptr;  // (rows, kVpCoeffs)
  double* out = nullptr;           // stats (rows, kVpStats) or sums (rows, kVpSums)
  void* grad_student = nullptr;    // (rows, vocab) contiguous, the student's dtype; null: not wanted
  void* grad_teacher = nullptr;
};

void vp_stats_DEFAULT(const VpArgs& args);
void vp_stats_AVX2(const VpArgs& args);
void vp_stats_AVX512(const VpArgs& args);
void vp_sums_DEFAULT(const VpArgs& args);
void vp_sums_AVX2(const VpArgs& args);
void vp_sums_AVX512(const VpArgs& args);
void vp_gradients_DEFAULT(const VpArgs& args);
void vp_gradients_AVX2(const VpArgs& args);
void vp_gradients_AVX512(const VpArgs& args);

}  // namespace fastkd::cpu
