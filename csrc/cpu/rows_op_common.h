// Host-side pieces shared by the CPU ops that return per-row terms (fastkd::distill_rows and
// fastkd::sparse_distill_rows): the per-row outputs, the float16 gradient pre-scale and the target
// range check.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "distill_op.h"

namespace fastkd::cpu {

inline at::Tensor rows_tensor(const std::vector<double>& rows, at::ScalarType dtype) {
  at::Tensor out = at::empty({int64_t(rows.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(rows.begin(), rows.end(), out.data_ptr<double>());
  return dtype == at::kDouble ? out : out.to(dtype);
}

// float16 gradients are computed in float32 (the logits widened first), then each row is stored
// multiplied by the power of two that brings its largest entry near 2^12 (fp16_gradient_prescale): a
// loss normalised by many rows does not flush to zero before backward multiplies by grad_output
// (under GradScaler, ~2^16), and no finite entry overflows. `scales` (the op's grad_scale row of this
// side) receives the powers; backward divides them out.
inline at::Tensor narrow_fp16_gradient(const at::Tensor& grad32, at::Tensor scales) {
  const at::Tensor amax = grad32.abs().amax(1);
  // 2^floor(log2(4096 / amax)), clamped to [2^-24, 2^40]; 1 for a row of zeros or a NaN / inf.
  at::Tensor power = at::exp2(at::clamp(at::floor(at::log2(4096.0 / amax)), -24, 40));
  power = at::where(at::isfinite(amax) & (amax > 0), power, at::ones_like(power));
  scales.copy_(power);
  return (grad32 * power.unsqueeze(1)).to(at::kHalf);
}

// A float16 side that wants a gradient is widened to float32 for the kernel (its gradient is then
// float32, narrowed per row after the kernel); other logits are kernel_view()'s.
inline at::Tensor kernel_logits(const at::Tensor& x, bool float64, bool widen_fp16) {
  return widen_fp16 && x.scalar_type() == at::kHalf && !float64 ? kernel_view(x, false).to(at::kFloat)
                                                                : kernel_view(x, float64);
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
