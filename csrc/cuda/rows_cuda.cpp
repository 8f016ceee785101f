// CUDA implementation of fastkd::distill_rows: checks, outputs, and the launch of rows_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/op_glue.h"
#include "cuda/rows_launch.h"
#include "distill_op.h"

namespace fastkd::cuda {
namespace {

RowsOutputs distill_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& soft_mask,
                              const at::Tensor& weights, double temperature, int64_t ignore_index,
                              double label_smoothing, c10::string_view divergence, double beta, bool student_grad,
                              bool teacher_grad) {
  const RowsCall call = prepare_rows_call(student, teacher, target, soft_mask, weights, temperature, ignore_index,
                                          label_smoothing, divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A mixed pair runs in the wider type, as on the CPU.
  const at::ScalarType compute = compute_dtype(student, teacher, call.float64);
  const at::Tensor s = rows_view(student, compute);
  const at::Tensor t = rows_view(teacher, compute);
  const RowBuffers b = row_buffers(student, target, soft_mask, weights, call.rows);
  const at::Tensor &y = b.target, &mask = b.soft_mask, &w = b.weights;
  const at::Tensor &row_loss = b.row_loss, &row_soft = b.row_soft, &row_hard = b.row_hard;
  at::Tensor grad_s = student_grad ? at::empty({call.rows, call.vocab}, s.options()) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? at::empty({call.rows, call.vocab}, t.options()) : at::empty({0}, teacher.options());
  const bool fp16_student = student_grad && student.scalar_type() == at::kHalf;
  const bool fp16_teacher = teacher_grad && teacher.scalar_type() == at::kHalf;
  at::Tensor grad_scale = fp16_gradient_scales(fp16_student || fp16_teacher, 2, call.rows, student.options());

  RowsKernelArgs a;
  a.dtype = kernel_dtype(compute);
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.soft_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  a.weights = w.const_data_ptr<double>();
  a.rows = call.rows;
  a.vocab = call.vocab;
  a.inv_temperature = call.params.inv_temperature;
  a.label_smoothing = label_smoothing;
  a.divergence = call.divergence.kind;
  a.beta = call.divergence.beta;
  a.one_minus_beta = call.divergence.one_minus_beta;
  a.fp16_student = fp16_student;
  a.fp16_teacher = fp16_teacher;
  a.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
  a.grad_teacher = teacher_grad ? grad_t.data_ptr() : nullptr;
  a.row_loss = row_loss.data_ptr<double>();
  a.row_soft = row_soft.data_ptr<double>();
  a.row_hard = row_hard.data_ptr<double>();
  a.grad_scale = grad_scale.dim() == 2 ? grad_scale.data_ptr<float>() : nullptr;
  launch_rows_kernel(a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Gradients in the dtype of their own logits (a widened mixed pair is narrowed back).
  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  if (teacher_grad && grad_t.scalar_type() != teacher.scalar_type()) grad_t = grad_t.to(teacher.scalar_type());
  const at::ScalarType loss_dtype = call.float64 ? at::kDouble : at::kFloat;
  return {row_loss.to(loss_dtype), row_soft.to(loss_dtype), row_hard.to(loss_dtype), grad_s, grad_t, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("distill_rows", &distill_rows_cuda);
}

}  // namespace fastkd::cuda
