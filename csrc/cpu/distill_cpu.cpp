// CPU implementation of the fastkd ops: checks, output allocation, ISA choice, reduction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/DispatchStub.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "cpu/distill_cpu_kernel.h"
#include "cpu/gradient_allocator.h"
#include "cpu/rows_op_common.h"
#include "cpu/cpu_capability.h"
#include "distill_op.h"

namespace fastkd::cpu {
namespace {

using RowsKernel = void (*)(const RowsArgs&);

RowsKernel select_kernel() {
  switch (active_capability()) {
#ifdef FASTKD_HAVE_ISA_AVX512
    case Capability::AVX512: return distill_rows_AVX512;
#endif
#ifdef FASTKD_HAVE_ISA_AVX2
    case Capability::AVX2: return distill_rows_AVX2;
#endif
    default: return distill_rows_DEFAULT;
  }
}

// FASTKD_CPU_BLOCK=n (tests only): rows are gathered in blocks of n elements instead of 1024, so
// merges of partial statistics (blocks that saw only -inf, NaN, a new maximum) run at small V.
int64_t test_block_size() {
  const char* v = std::getenv("FASTKD_CPU_BLOCK");
  return v == nullptr ? 0 : std::max<int64_t>(0, std::atoll(v));
}

RowsOutputs distill_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& soft_mask,
                             const at::Tensor& weights, double temperature, int64_t ignore_index,
                             double label_smoothing, c10::string_view divergence, double beta, bool student_grad,
                             bool teacher_grad) {
  const RowsCall call = prepare_rows_call(student, teacher, target, soft_mask, weights, temperature, ignore_index,
                                          label_smoothing, divergence, beta);
  const bool fp16_student = student_grad && student.scalar_type() == at::kHalf;
  const bool fp16_teacher = teacher_grad && teacher.scalar_type() == at::kHalf;
  const at::Tensor s = kernel_logits(student, call.float64, fp16_student);
  const at::Tensor t = kernel_logits(teacher, call.float64, fp16_teacher);
  at::Tensor y;
  if (target.has_value()) {
    y = target->to(at::kLong).contiguous();
    count_unmasked_rows(y, call.vocab, ignore_index);
  }
  at::Tensor mask = soft_mask.has_value() ? soft_mask->contiguous() : at::Tensor();
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  LossParams params = call.params;
  params.soft_weight = w.const_data_ptr<double>()[0];
  params.hard_weight = w.const_data_ptr<double>()[1];

  at::Tensor grad_s = student_grad ? empty_gradient(s.sizes(), s.scalar_type()) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? empty_gradient(t.sizes(), t.scalar_type()) : at::empty({0}, teacher.options());

  std::vector<double> row_loss(call.rows), row_soft(call.rows), row_hard(call.rows);
  RowsArgs args;
  args.student = s.const_data_ptr();
  args.teacher = t.const_data_ptr();
  args.student_row_stride = s.stride(0);
  args.teacher_row_stride = t.stride(0);
  args.student_dtype = s.scalar_type();
  args.teacher_dtype = t.scalar_type();
  args.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  args.ignore_index = ignore_index;
  args.soft_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  args.divergence = call.divergence;
  args.rows = call.rows;
  args.vocab = call.vocab;
  args.params = params;
  args.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
  args.grad_teacher = teacher_grad ? grad_t.data_ptr() : nullptr;
  args.row_loss = row_loss.data();
  args.row_soft = row_soft.data();
  args.row_hard = row_hard.data();
  args.block_size = test_block_size();
  if (call.rows > 0) select_kernel()(args);

  at::Tensor grad_scale = fp16_gradient_scales(fp16_student || fp16_teacher, 2, call.rows, student.options());
  if (grad_scale.dim() == 2) grad_scale.fill_(1.0f);
  if (fp16_student) grad_s = narrow_fp16_gradient(grad_s, grad_scale[0]);
  if (fp16_teacher) grad_t = narrow_fp16_gradient(grad_t, grad_scale[1]);
  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  if (teacher_grad && grad_t.scalar_type() != teacher.scalar_type()) grad_t = grad_t.to(teacher.scalar_type());
  const at::ScalarType loss_dtype = call.float64 ? at::kDouble : at::kFloat;
  return {rows_tensor(row_loss, loss_dtype), rows_tensor(row_soft, loss_dtype), rows_tensor(row_hard, loss_dtype),
          grad_s, grad_t, grad_scale};
}

// The forward-KL op with the reduction inside (the CUDA kernel's contract), on top of distill_rows:
// the reduction's scale goes into the row weights, and the rows are summed here in a fixed order.
ForwardOutputs distill_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& target, double temperature, double alpha,
                                   int64_t ignore_index, double label_smoothing, bool scale_by_temperature_squared,
                                   c10::string_view reduction, int64_t batch_size, bool student_grad,
                                   bool teacher_grad) {
  const PreparedCall call =
      prepare_call(student, teacher, target, temperature, alpha, ignore_index, label_smoothing,
                   scale_by_temperature_squared, reduction, batch_size, student_grad, teacher_grad);
  int64_t unmasked = call.rows;
  if (target.has_value()) unmasked = count_unmasked_rows(target->to(at::kLong).contiguous(), call.vocab, ignore_index);
  const bool rows_out = call.reduction == Reduction::None;
  const double scale = rows_out ? 1.0 : reduction_scale(call.reduction, unmasked, call.batch_size);
  const at::Tensor weights = at::tensor({call.params.soft_weight * scale, call.params.hard_weight * scale},
                                        at::TensorOptions().dtype(at::kDouble));
  auto [loss, soft, hard, grad_s, grad_t, grad_scale] =
      distill_rows_cpu(student, teacher, target, std::nullopt, weights, temperature, ignore_index, label_smoothing,
                       "forward_kl", 0.0, student_grad, teacher_grad);
  if (grad_scale.dim() == 2) {  // this op's gradient is the reduced loss's own: the pre-scales undone
    const auto unscaled = [](const at::Tensor& g, const at::Tensor& scale) {
      return (g.to(at::kFloat) / scale.unsqueeze(1)).to(g.scalar_type());
    };
    if (student_grad) grad_s = unscaled(grad_s, grad_scale[0]);
    if (teacher_grad) grad_t = unscaled(grad_t, grad_scale[1]);
  }
  if (rows_out) return {loss, soft, hard, grad_s, grad_t};
  const auto total = [](const at::Tensor& rows, double factor) {
    return (rows.sum(0, /*keepdim=*/false, at::kDouble) * factor).to(rows.scalar_type());
  };
  return {total(loss, 1.0), total(soft, scale), total(hard, scale), grad_s, grad_t};
}

void scale_grad_cpu_(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.numel() == 1) {
    if (grad_output.item<double>() == 1.0) return;  // the usual loss.backward(): nothing to do
    grad.mul_(grad_output.reshape({}));
    return;
  }
  TORCH_CHECK_VALUE(grad_output.numel() == grad.size(0), "fastkd::scale_grad_: grad_output has ",
                    grad_output.numel(), " values for ", grad.size(0), " rows");
  // In the factor's own precision: rounding it to a float16 gradient's dtype first adds an error.
  grad.mul_(grad_output.reshape({grad.size(0), 1}));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("distill_forward", &distill_forward_cpu);
  m.impl("distill_rows", &distill_rows_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
}

}  // namespace fastkd::cpu
