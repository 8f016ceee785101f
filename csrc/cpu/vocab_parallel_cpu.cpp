// CPU implementation of the vocabulary-parallel ops: checks, outputs, ISA choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "cpu/vocab_parallel_cpu_kernel.h"
#include "distill_op.h"
#include "vocab_parallel_op.h"

namespace fastkd::cpu {
namespace {

using VpKernel = void (*)(const VpArgs&);

template <VpKernel kDefault, VpKernel kAvx2, VpKernel kAvx512>
VpKernel for_isa() {
  switch (active_capability()) {
#ifdef FASTKD_HAVE_ISA_AVX512
    case Capability::AVX512: return kAvx512;
#endif
#ifdef FASTKD_HAVE_ISA_AVX2
    case Capability::AVX2: return kAvx2;
#endif
    default: return kDefault;
  }
}

VpArgs base_args(const VpLogits& x, const at::Tensor& y, int64_t ignore_index, double temperature) {
  check_vp_temperature(temperature);
  VpArgs a;
  a.student = x.student.const_data_ptr();
  a.student_row_stride = x.student.stride(0);
  a.student_dtype = x.student.scalar_type();
  if (x.teacher.defined()) {
    a.teacher = x.teacher.const_data_ptr();
    a.teacher_row_stride = x.teacher.stride(0);
    a.teacher_dtype = x.teacher.scalar_type();
  }
  a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.rows = x.student.size(0);
  a.vocab = x.student.size(1);
  a.inv_temperature = 1.0 / temperature;
  return a;
}

at::Tensor vocab_parallel_stats_cpu(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                    const std::optional<at::Tensor>& target, double temperature,
                                    int64_t ignore_index, int64_t vocab_start) {
  const VpLogits x = vp_logits(student, teacher);
  const at::Tensor y = long_target(target, student.size(0));
  VpArgs a = base_args(x, y, ignore_index, temperature);
  a.vocab_start = vocab_start;
  at::Tensor out = at::empty({a.rows, kVpStats}, student.options().dtype(at::kDouble));
  a.out = out.data_ptr<double>();
  if (a.rows > 0) for_isa<vp_stats_DEFAULT, vp_stats_AVX2, vp_stats_AVX512>()(a);
  return out;
}

at::Tensor vocab_parallel_sums_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& frame,
                                   double temperature, c10::string_view divergence, double beta) {
  const VpLogits x = vp_logits(student, teacher);
  VpArgs a = base_args(x, at::Tensor(), -100, temperature);
  a.divergence = parse_divergence(divergence, beta);
  const at::Tensor f = row_table(frame, a.rows, kVpFrame, "frame");
  a.frame = f.const_data_ptr<double>();
  at::Tensor out = at::empty({a.rows, kVpSums}, student.options().dtype(at::kDouble));
  a.out = out.data_ptr<double>();
  if (a.rows > 0) for_isa<vp_sums_DEFAULT, vp_sums_AVX2, vp_sums_AVX512>()(a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> vocab_parallel_gradients_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const at::Tensor& frame, const at::Tensor& coeffs, double temperature, int64_t ignore_index, int64_t vocab_start,
    int64_t global_vocab, double label_smoothing, c10::string_view divergence, double beta, bool student_grad,
    bool teacher_grad) {
  const VpLogits x = vp_logits(student, teacher);
  const at::Tensor y = long_target(target, student.size(0));
  VpArgs a = base_args(x, y, ignore_index, temperature);
  a.vocab_start = vocab_start;
  a.global_vocab = global_vocab;
  a.label_smoothing = label_smoothing;
  a.divergence = parse_divergence(divergence, beta);
  const at::Tensor f = row_table(frame, a.rows, kVpFrame, "frame");
  const at::Tensor k = row_table(coeffs, a.rows, kVpCoeffs, "coeffs");
  a.frame = f.const_data_ptr<double>();
  a.coeffs = k.const_data_ptr<double>();
  // Gradients in the logits' own dtypes (the float64 widening undone at the end).
  at::Tensor gs = student_grad ? at::empty(x.student.sizes(), x.student.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? at::empty(x.teacher.sizes(), x.teacher.options()) : at::empty({0}, teacher.options());
  a.grad_student = student_grad ? gs.data_ptr() : nullptr;
  a.grad_teacher = teacher_grad ? gt.data_ptr() : nullptr;
  if (a.rows > 0 && (student_grad || teacher_grad)) {
    for_isa<vp_gradients_DEFAULT, vp_gradients_AVX2, vp_gradients_AVX512>()(a);
  }
  if (student_grad && gs.scalar_type() != student.scalar_type()) gs = gs.to(student.scalar_type());
  if (teacher_grad && gt.scalar_type() != teacher.scalar_type()) gt = gt.to(teacher.scalar_type());
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cpu);
  m.impl("vocab_parallel_sums", &vocab_parallel_sums_cpu);
  m.impl("vocab_parallel_gradients", &vocab_parallel_gradients_cpu);
}

}  // namespace fastkd::cpu
