// CUDA implementation of the vocabulary-parallel ops: checks, outputs, and the launches of
// vocab_parallel_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/op_glue.h"
#include "cuda/vocab_parallel_launch.h"
#include "vocab_parallel_op.h"

namespace fastkd::cuda {
namespace {

// Both sides in one compute dtype (the kernel reads a pair of one type), and the launch's common fields.
struct VpCall {
  at::Tensor s, t, y;
  VpKernelArgs a;
};

VpCall prepare(VpPass pass, const at::Tensor& student, const at::Tensor& teacher,
               const std::optional<at::Tensor>& target, double temperature, int64_t ignore_index) {
  check_vp_temperature(temperature);
  const VpLogits x = vp_logits(student, teacher);
  VpCall c;
  const at::ScalarType compute = compute_dtype(x.student, x.teacher, x.student.scalar_type() == at::kDouble);
  c.s = rows_view(x.student, compute);
  c.t = rows_view(x.teacher, compute);
  c.y = long_target(target, student.size(0));
  VpKernelArgs& a = c.a;
  a.pass = pass;
  a.dtype = kernel_dtype(compute);
  a.student = c.s.const_data_ptr();
  a.teacher = c.t.const_data_ptr();
  a.student_row_stride = c.s.stride(0);
  a.teacher_row_stride = c.t.stride(0);
  a.target = c.y.defined() ? c.y.const_data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.rows = c.s.size(0);
  a.vocab = c.s.size(1);
  a.inv_temperature = 1.0 / temperature;
  return c;
}

void set_divergence(VpKernelArgs& a, c10::string_view divergence, double beta) {
  const DivergenceParams d = parse_divergence(divergence, beta);
  a.divergence = d.kind;
  a.beta = d.beta;
  a.one_minus_beta = d.one_minus_beta;
}

void launch(const VpKernelArgs& a) {
  launch_vocab_parallel_kernel(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor vocab_parallel_stats_cuda(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                     const std::optional<at::Tensor>& target, double temperature,
                                     int64_t ignore_index, int64_t vocab_start) {
  TORCH_CHECK_VALUE(teacher.has_value(), FASTKD_VP_OP "the CUDA statistics pass takes teacher logits");
  const c10::cuda::CUDAGuard guard(student.device());
  VpCall c = prepare(VpPass::Stats, student, *teacher, target, temperature, ignore_index);
  c.a.vocab_start = vocab_start;
  at::Tensor out = at::empty({c.a.rows, kVpStats}, student.options().dtype(at::kDouble));
  c.a.out = out.data_ptr<double>();
  launch(c.a);
  return out;
}

at::Tensor vocab_parallel_sums_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& frame,
                                    double temperature, c10::string_view divergence, double beta) {
  const c10::cuda::CUDAGuard guard(student.device());
  VpCall c = prepare(VpPass::Sums, student, teacher, std::nullopt, temperature, -100);
  set_divergence(c.a, divergence, beta);
  const at::Tensor f = row_table(frame, c.a.rows, kVpFrame, "frame");
  c.a.frame = f.const_data_ptr<double>();
  at::Tensor out = at::empty({c.a.rows, kVpSums}, student.options().dtype(at::kDouble));
  c.a.out = out.data_ptr<double>();
  launch(c.a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> vocab_parallel_gradients_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const at::Tensor& frame, const at::Tensor& coeffs, double temperature, int64_t ignore_index, int64_t vocab_start,
    int64_t global_vocab, double label_smoothing, c10::string_view divergence, double beta, bool student_grad,
    bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  VpCall c = prepare(VpPass::Gradients, student, teacher, target, temperature, ignore_index);
  set_divergence(c.a, divergence, beta);
  c.a.vocab_start = vocab_start;
  c.a.global_vocab = global_vocab;
  c.a.label_smoothing = label_smoothing;
  const at::Tensor f = row_table(frame, c.a.rows, kVpFrame, "frame");
  const at::Tensor k = row_table(coeffs, c.a.rows, kVpCoeffs, "coeffs");
  c.a.frame = f.const_data_ptr<double>();
  c.a.coeffs = k.const_data_ptr<double>();
  at::Tensor gs = student_grad ? at::empty(c.s.sizes(), c.s.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? at::empty(c.t.sizes(), c.t.options()) : at::empty({0}, teacher.options());
  c.a.grad_student = student_grad ? gs.data_ptr() : nullptr;
  c.a.grad_teacher = teacher_grad ? gt.data_ptr() : nullptr;
  if (student_grad || teacher_grad) launch(c.a);
  // Gradients in the dtype of their own logits (a widened pair is narrowed back).
  if (student_grad && gs.scalar_type() != student.scalar_type()) gs = gs.to(student.scalar_type());
  if (teacher_grad && gt.scalar_type() != teacher.scalar_type()) gt = gt.to(teacher.scalar_type());
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cuda);
  m.impl("vocab_parallel_sums", &vocab_parallel_sums_cuda);
  m.impl("vocab_parallel_gradients", &vocab_parallel_gradients_cuda);
}

}  // namespace fastkd::cuda
