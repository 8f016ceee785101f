// CUDA implementation of fastkd::sparse_distill_rows: the checks shared with the CPU op, outputs, and
// the launch of sparse_kernel.cu. Nothing here reads device memory: where the CPU op raises for an
// index out of range or listed twice in a row (and for a target out of range), the kernel stops on a
// device-side assert, as the dense CUDA ops do for targets, so that the op never waits for the device
// and can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/op_glue.h"
#include "cuda/sparse_launch.h"
#include "distill_op.h"

namespace fastkd::cuda {
namespace {

int multiprocessors(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

SparseOutputs sparse_distill_rows_cuda(const at::Tensor& student, const at::Tensor& indices,
                                       const at::Tensor& values, const std::optional<at::Tensor>& target,
                                       const std::optional<at::Tensor>& soft_mask, const at::Tensor& weights,
                                       double temperature, int64_t ignore_index, double label_smoothing,
                                       c10::string_view divergence, double beta, c10::string_view tail,
                                       bool student_grad) {
  const SparseCall call = prepare_sparse_call(student, indices, values, target, soft_mask, weights, temperature,
                                              label_smoothing, divergence, beta, tail);
  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor s = kernel_view(student, call.float64);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor val = values.to(at::kDouble).contiguous();  // O(rows K): the teacher is small
  const RowBuffers b = row_buffers(student, target, soft_mask, weights, call.rows);
  const at::Tensor &y = b.target, &mask = b.soft_mask, &w = b.weights;
  const at::Tensor &row_loss = b.row_loss, &row_soft = b.row_soft, &row_hard = b.row_hard;
  at::Tensor grad_s = student_grad ? at::empty({call.rows, call.vocab}, s.options()) : at::empty({0}, student.options());
  const bool fp16_grad = student_grad && student.scalar_type() == at::kHalf;
  at::Tensor grad_scale = fp16_gradient_scales(fp16_grad, 1, call.rows, student.options());
  // Each block holds a bitmap of the vocabulary (its row's support), zero between rows.
  const int64_t blocks =
      call.rows > 0 ? sparse_grid_blocks(kernel_dtype(s.scalar_type()), call.rows, multiprocessors(s.get_device())) : 0;
  const at::Tensor support =
      at::zeros({std::max<int64_t>(blocks, 1) * sparse_support_words(call.vocab)}, student.options().dtype(at::kInt));

  SparseKernelArgs a;
  a.dtype = kernel_dtype(s.scalar_type());
  a.student = s.const_data_ptr();
  a.student_row_stride = s.stride(0);
  a.indices = idx.const_data_ptr();
  a.indices_int64 = idx.scalar_type() == at::kLong;
  a.values = val.const_data_ptr<double>();
  a.k = idx.size(1);
  a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.soft_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  a.weights = w.const_data_ptr<double>();
  a.rows = call.rows;
  a.vocab = call.vocab;
  a.label_smoothing = label_smoothing;
  a.sparse = call.sparse;
  a.fp16_grad = fp16_grad;
  a.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
  a.row_loss = row_loss.data_ptr<double>();
  a.row_soft = row_soft.data_ptr<double>();
  a.row_hard = row_hard.data_ptr<double>();
  a.grad_scale = fp16_grad ? grad_scale.data_ptr<float>() : nullptr;
  a.support = static_cast<uint32_t*>(support.data_ptr());
  a.blocks = blocks;
  launch_sparse_kernel(a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The gradient in the student's dtype (a student widened to float64 is narrowed back).
  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  const at::ScalarType loss_dtype = call.float64 ? at::kDouble : at::kFloat;
  return {row_loss.to(loss_dtype), row_soft.to(loss_dtype), row_hard.to(loss_dtype), grad_s, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("sparse_distill_rows", &sparse_distill_rows_cuda);
}

}  // namespace fastkd::cuda
