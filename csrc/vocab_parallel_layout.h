// The per-row tables the vocabulary-parallel passes exchange with their caller (float64, one row per
// logits row), shared by the CPU and CUDA kernels and described in fastkd/vocab_parallel/passes.py.
#pragma once

namespace fastkd {

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

}  // namespace fastkd
