// Host-side pieces shared by the CPU ops that return per-row terms (fastkd::distill_rows and
// fastkd::sparse_distill_rows): the per-row outputs, the float16 gradient pre-scale and the target
// range check.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "divergence_row.h"

namespace fastkd::cpu {

inline at::Tensor rows_tensor(const std::vector<double>& rows, at::ScalarType dtype) {
  at::Tensor out = at::empty({int64_t(rows.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(rows.begin(), rows.end(), out.data_ptr<double>());
  return dtype == at::kDouble ? out : out.to(dtype);
}

// Power of two that a float16 gradient is stored multiplied by, so that entries of a loss normalised
// by many rows are not flushed to zero before backward multiplies by grad_output (under GradScaler,
// ~2^16): it brings the largest possible entry near 2^12. 1 for other dtypes.
inline double fp16_prescale(bool fp16, double soft_weight, double hard_weight, double inv_t,
                            const DivergenceParams& d) {
  if (!fp16) return 1.0;
  return fp16_gradient_prescale(std::fabs(soft_weight) * inv_t * divergence_gradient_bound(d) +
                                2 * std::fabs(hard_weight));
}

// Rows whose target is not ignore_index; raises IndexError for a target outside [0, vocab).
inline int64_t count_unmasked_rows(const at::Tensor& target, int64_t vocab, int64_t ignore_index) {
  const int64_t* y = target.const_data_ptr<int64_t>();
  int64_t unmasked = 0;
  for (int64_t i = 0; i < target.numel(); ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < vocab, "target value ", y[i], " at row ", i,
                      " is out of range: expected a class index in [0, ", vocab, ") or ignore_index (",
                      ignore_index, ")");
    ++unmasked;
  }
  return unmasked;
}

}  // namespace fastkd::cpu
