// Host-side checks and set-up shared by the CPU and CUDA implementations of the fastkd ops.
// The Python layer validates first with friendlier messages; these checks guard direct op calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "divergence_row.h"
#include "sparse_row.h"

namespace fastkd {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  if (name == "batchmean") return Reduction::BatchMean;
  if (name == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'batchmean', 'none', got '",
                    std::string(name), "'");
}

inline DivergenceParams parse_divergence(c10::string_view name, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0 && beta <= 1, "beta must be in [0, 1], got ", beta);
  DivergenceParams d;
  d.beta = beta;
  d.one_minus_beta = 1.0 - beta;
  if (name == "forward_kl") {
    d.kind = Divergence::ForwardKL;
  } else if (name == "reverse_kl") {
    d.kind = Divergence::ReverseKL;
  } else if (name == "jsd") {
    // The endpoints are the two KL directions, not the mixture's limit 0 (TRL GKD / Liger convention).
    d.kind = beta == 0 ? Divergence::ForwardKL : beta == 1 ? Divergence::ReverseKL : Divergence::JSD;
  } else if (name == "tvd") {
    d.kind = Divergence::TVD;
  } else if (name == "skew_forward_kl" || name == "skew_reverse_kl") {
    TORCH_CHECK_VALUE(beta < 1, "beta must be in [0, 1) for ", std::string(name), ", got ", beta);
    const bool forward = name == "skew_forward_kl";
    if (beta == 0) {
      d.kind = forward ? Divergence::ForwardKL : Divergence::ReverseKL;
    } else {
      d.kind = forward ? Divergence::SkewForwardKL : Divergence::SkewReverseKL;
    }
  } else {
    TORCH_CHECK_VALUE(false, "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'tvd', "
                             "'skew_forward_kl', 'skew_reverse_kl', got '", std::string(name), "'");
  }
  return d;
}

// Per-row inputs beside the student's (rows, vocab) logits: target (integer, (rows,)) and soft_mask
// (bool, (rows,)), on the student's device.
inline void check_row_inputs(const char* op, const at::Tensor& student, const std::optional<at::Tensor>& target,
                             const std::optional<at::Tensor>& soft_mask) {
  const int64_t rows = student.size(0);
  if (target.has_value()) {
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == rows, op, ": target must have shape (", rows,
                      "), got ", target->sizes());
    TORCH_CHECK_TYPE(!at::isFloatingType(target->scalar_type()) && !at::isComplexType(target->scalar_type()) &&
                         target->scalar_type() != at::kBool,
                     op, ": target must be an integer tensor, got ", target->scalar_type());
    TORCH_CHECK(target->device() == student.device(), op, ": target is on ", target->device(),
                " but student_logits is on ", student.device());
  }
  if (soft_mask.has_value()) {
    TORCH_CHECK_VALUE(soft_mask->dim() == 1 && soft_mask->size(0) == rows, op, ": soft_mask must have shape (",
                      rows, "), got ", soft_mask->sizes());
    TORCH_CHECK_TYPE(soft_mask->scalar_type() == at::kBool, op, ": soft_mask must be bool, got ",
                     soft_mask->scalar_type());
    TORCH_CHECK(soft_mask->device() == student.device(), op, ": soft_mask is on ", soft_mask->device(),
                " but student_logits is on ", student.device());
  }
}

// Checks shared by the ops that read (rows, vocab) logit pairs; `op` names the op in the messages.
inline void check_logit_rows(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& target, double temperature, double label_smoothing) {
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": student_logits must be 2-D (rows, vocab), got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), op, ": teacher_logits shape ", teacher.sizes(),
                    " differs from student_logits shape ", student.sizes());
  TORCH_CHECK(teacher.device() == student.device(), op, ": teacher_logits is on ", teacher.device(),
              " but student_logits is on ", student.device());
  TORCH_CHECK_VALUE(student.size(1) > 0, op, ": the vocabulary (last dim) is empty");
  for (const at::Tensor* x : {&student, &teacher}) {
    const auto dt = x->scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
                     ": logits must be float32, bfloat16, float16 or float64, got ", dt);
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1, op,
                    ": label_smoothing must be in [0, 1), got ", label_smoothing);
  check_row_inputs(op, student, target, std::nullopt);
}

// The LossParams every op derives the same way (the weights are the op's own).
inline LossParams base_loss_params(double temperature, double label_smoothing, int64_t vocab, bool has_target,
                                   bool float64) {
  LossParams p;
  p.inv_temperature = 1.0 / temperature;
  p.label_smoothing = label_smoothing;
  p.vocab = vocab;
  p.has_soft = true;
  p.has_hard = has_target;
  // T when it is 1, 2 or 4: the cross-entropy's exp stream is a power of the T stream.
  p.integer_temperature = (temperature == 1.0 || temperature == 2.0 || temperature == 4.0) ? int(temperature) : 0;
  p.element_epsilon = float64 ? 1.2e-16 : 6e-8;
  return p;
}

// Everything a backend needs to launch, derived once from the op's arguments.
struct PreparedCall {
  LossParams params;
  Reduction reduction = Reduction::Mean;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t batch_size = 0;
  int64_t ignore_index = -100;
  bool student_grad = false;
  bool teacher_grad = false;
  bool float64 = false;  // compute (and return the loss) in float64
};

inline PreparedCall prepare_call(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& target, double temperature, double alpha,
                                 int64_t ignore_index, double label_smoothing, bool scale_by_temperature_squared,
                                 c10::string_view reduction, int64_t batch_size, bool student_grad,
                                 bool teacher_grad) {
  check_logit_rows("fastkd::distill_forward", student, teacher, target, temperature, label_smoothing);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "fastkd::distill_forward: alpha must be in [0, 1], got ", alpha);
  if (!target.has_value()) {
    TORCH_CHECK_VALUE(alpha == 1.0, "fastkd::distill_forward: target is required when alpha < 1 (got alpha=",
                      alpha, ")");
  }

  PreparedCall call;
  call.reduction = parse_reduction(reduction);
  call.rows = student.size(0);
  call.vocab = student.size(1);
  call.batch_size = batch_size;
  call.ignore_index = ignore_index;
  call.student_grad = student_grad;
  call.teacher_grad = teacher_grad;
  call.float64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;

  // Both terms are computed whenever they are defined, even at weight 0, so return_terms reports
  // them truthfully; alpha only weighs them. The hard term needs a target.
  call.params = base_loss_params(temperature, label_smoothing, call.vocab, target.has_value(), call.float64);
  call.params.hard_weight = 1.0 - alpha;
  call.params.soft_weight = alpha * (scale_by_temperature_squared ? temperature * temperature : 1.0);
  return call;
}

}  // namespace fastkd

namespace fastkd {

using RowsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fastkd::distill_rows, checked and derived once. The weights are read by the backend (on its device).
struct RowsCall {
  LossParams params;
  DivergenceParams divergence;
  int64_t rows = 0;
  int64_t vocab = 0;
  bool float64 = false;
};

// What both row ops derive from checked arguments: the teacher side (logits, or top-k values) only
// decides, with the student, whether the call runs in float64.
inline RowsCall derive_rows_call(const at::Tensor& student, const at::Tensor& teacher_side, bool has_target,
                                 double temperature, double label_smoothing, c10::string_view divergence,
                                 double beta) {
  RowsCall call;
  call.divergence = parse_divergence(divergence, beta);
  call.rows = student.size(0);
  call.vocab = student.size(1);
  call.float64 = student.scalar_type() == at::kDouble || teacher_side.scalar_type() == at::kDouble;
  call.params = base_loss_params(temperature, label_smoothing, call.vocab, has_target, call.float64);
  return call;
}

inline RowsCall prepare_rows_call(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& soft_mask,
                                  const at::Tensor& weights, double temperature, int64_t ignore_index,
                                  double label_smoothing, c10::string_view divergence, double beta) {
  check_logit_rows("fastkd::distill_rows", student, teacher, target, temperature, label_smoothing);
  TORCH_CHECK_VALUE(weights.numel() == 2 && weights.is_floating_point(),
                    "fastkd::distill_rows: weights must hold 2 floats (soft, hard), got ", weights.sizes());
  TORCH_CHECK(weights.device() == student.device(), "fastkd::distill_rows: weights is on ", weights.device(),
              " but student_logits is on ", student.device());
  check_row_inputs("fastkd::distill_rows", student, std::nullopt, soft_mask);
  return derive_rows_call(student, teacher, target.has_value(), temperature, label_smoothing, divergence, beta);
}

}  // namespace fastkd

namespace fastkd {

using SparseOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fastkd::sparse_distill_rows, checked and derived once. The weights are read by the backend (on its
// device); so are the index values: the CPU checks their range and repeats on the host, CUDA asserts
// on the device (reading them here would synchronise with the host).
struct SparseCall : RowsCall {
  SparseRowConfig sparse;
};

// Logits as the kernels read them: unit stride along the vocabulary, any row stride (a vocabulary
// slice is not copied). float64 pairs widen the other side.
inline at::Tensor kernel_view(const at::Tensor& x, bool float64) {
  at::Tensor v = x.stride(1) == 1 && x.stride(0) >= 0 ? x : x.contiguous();
  return float64 && v.scalar_type() != at::kDouble ? v.to(at::kDouble) : v;
}

// The grad_scale output of the row ops: (sides, rows) float32 per-row pre-scales (student, then teacher)
// when a wanted gradient is float16 (the backend fills it), else a scalar 1 (nothing to undo).
inline at::Tensor fp16_gradient_scales(bool prescaled, int64_t sides, int64_t rows, const at::TensorOptions& opts) {
  const auto f32 = opts.dtype(at::kFloat);
  return prescaled ? at::empty({sides, rows}, f32) : at::ones({}, f32);
}

inline bool is_logit_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble;
}

inline SparseCall prepare_sparse_call(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                                      const std::optional<at::Tensor>& target,
                                      const std::optional<at::Tensor>& soft_mask, const at::Tensor& weights,
                                      double temperature, double label_smoothing, c10::string_view divergence,
                                      double beta, c10::string_view tail) {
#define FASTKD_OP "fastkd::sparse_distill_rows: "
  TORCH_CHECK_VALUE(student.dim() == 2, FASTKD_OP "student_logits must be 2-D (rows, vocab), got ", student.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, FASTKD_OP "the vocabulary (last dim) is empty");
  TORCH_CHECK_TYPE(is_logit_dtype(student.scalar_type()),
                   FASTKD_OP "student_logits must be float32, bfloat16, float16 or float64, got ",
                   student.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.size(1) >= 1,
                    FASTKD_OP "indices must have shape (", student.size(0), ", K >= 1), got ", indices.sizes());
  TORCH_CHECK_VALUE(values.sizes() == indices.sizes(), FASTKD_OP "values shape ", values.sizes(),
                    " differs from indices shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   FASTKD_OP "indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(is_logit_dtype(values.scalar_type()),
                   FASTKD_OP "values must be float32, bfloat16, float16 or float64, got ", values.scalar_type());
  for (const at::Tensor* x : {&indices, &values, &weights}) {
    TORCH_CHECK(x->device() == student.device(), FASTKD_OP "an input is on ", x->device(),
                " but student_logits is on ", student.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    FASTKD_OP "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1,
                    FASTKD_OP "label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK_VALUE(weights.numel() == 2 && weights.is_floating_point(),
                    FASTKD_OP "weights must hold 2 floats (soft, hard), got ", weights.sizes());
  TORCH_CHECK_VALUE(tail == "renormalize" || tail == "bucket",
                    FASTKD_OP "tail must be 'renormalize' or 'bucket', got '", std::string(tail), "'");
#undef FASTKD_OP
  check_row_inputs("fastkd::sparse_distill_rows", student, target, soft_mask);
  SparseCall call{derive_rows_call(student, values, target.has_value(), temperature, label_smoothing, divergence, beta),
                  {}};
  call.sparse.divergence = call.divergence;
  call.sparse.inv_temperature = call.params.inv_temperature;
  call.sparse.full_forward_kl = divergence == "forward_kl";  // jsd / skew at beta = 0 use the support rule
  call.sparse.bucket = tail == "bucket";
  return call;
}

}  // namespace fastkd
