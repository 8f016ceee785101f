// Host-side checks and inputs shared by the CPU and CUDA glue of the vocabulary-parallel ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "distill_op.h"

namespace fastkd {

#define FASTKD_VP_OP "fastkd::vocab_parallel: "

// The logits as the kernel reads them: a float64 side widens the other.
struct VpLogits {
  at::Tensor student, teacher;
};

inline VpLogits vp_logits(const at::Tensor& student, const std::optional<at::Tensor>& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 2, FASTKD_VP_OP "student logits must be 2-D (rows, local vocab), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(is_logit_dtype(student.scalar_type()), FASTKD_VP_OP "student logits must be floating point, got ",
                    student.scalar_type());
  bool float64 = student.scalar_type() == at::kDouble;
  if (teacher.has_value()) {
    TORCH_CHECK_VALUE(teacher->sizes() == student.sizes(), FASTKD_VP_OP "teacher logits ", teacher->sizes(),
                      " and student logits ", student.sizes(), " differ in shape");
    TORCH_CHECK_VALUE(is_logit_dtype(teacher->scalar_type()),
                      FASTKD_VP_OP "teacher logits must be floating point, got ", teacher->scalar_type());
    float64 = float64 || teacher->scalar_type() == at::kDouble;
  }
  VpLogits out;
  out.student = kernel_view(student, float64);
  if (teacher.has_value()) out.teacher = kernel_view(*teacher, float64);
  return out;
}

inline at::Tensor row_table(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, FASTKD_VP_OP, name, " must be (", rows,
                    ", ", cols, "), got ", t.sizes());
  return t.to(at::kDouble).contiguous();
}

inline at::Tensor long_target(const std::optional<at::Tensor>& target, int64_t rows) {
  if (!target.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == rows, FASTKD_VP_OP "target must be (", rows,
                    "), got ", target->sizes());
  return target->to(at::kLong).contiguous();
}

inline void check_vp_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, FASTKD_VP_OP "temperature must be > 0, got ",
                    temperature);
}

}  // namespace fastkd
