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

namespace fastkd::cpu {

// Columns of the (rows, kVpStats) float64 statistics: the maxima are raw logits, the sums relative to
// them: sum_t = sum exp((t - max_t) / T), sum_b = sum exp((s - max_s) / T), sum_1 = sum exp(s - max_s).
enum VpStats : int { kMaxT, kSumT, kMaxS, kSumB, kSum1, kSumS, kTargetLogit, kVpStats };
// Columns of the (rows, kVpFrame) float64 global frame: delta = lse(t / T) - lse(s / T).
enum VpFrame : int { kFrameMaxT, kFrameMaxS, kFrameInvSumT, kFrameInvSumB, kFrameInvSum1, kFrameDelta, kVpFrame };
// Columns of the (rows, kVpCoeffs) float64 gradient coefficients: dLoss/ds_j = soft (qg_j - q_j qg_sum)
// + hard (r_j - eps / V - [j == y] (1 - eps)), dLoss/dt_j = soft (ph_j - p_j ph_sum).
enum VpCoeffs : int { kCoefSoft, kCoefHard, kCoefQgSum, kCoefPhSum, kVpCoeffs };
// Columns of the (rows, kVpSums) float64 local sums.
enum VpSums : int { kSumF, kSumQg, kSumPh, kVpSums };

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
