// CPU implementation of fastkd::sparse_distill_rows (a teacher given as its top-k entries): checks,
// output allocation, ISA choice. The kernel is sparse_cpu_kernel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_capability.h"
#include "cpu/gradient_allocator.h"
#include "cpu/rows_op_common.h"
#include "cpu/sparse_cpu_kernel.h"
#include "distill_op.h"

namespace fastkd::cpu {
namespace {

using SparseKernel = void (*)(const SparseArgs&);

SparseKernel select_sparse_kernel() {
  switch (active_capability()) {
#ifdef FASTKD_HAVE_ISA_AVX512
    case Capability::AVX512: return sparse_rows_AVX512;
#endif
#ifdef FASTKD_HAVE_ISA_AVX2
    case Capability::AVX2: return sparse_rows_AVX2;
#endif
    default: return sparse_rows_DEFAULT;
  }
}

// Indices of the valid (non -inf) slots must lie in [0, vocab) (the kernel reads the student there)
// and appear once per row (the tail's sum zeroes the support's entries once each). One stamp per
// vocabulary entry, the last row that listed it: O(rows K), no sort.
template <class index_t>
void check_indices(const at::Tensor& indices, const at::Tensor& values, int64_t vocab) {
  const index_t* idx = indices.const_data_ptr<index_t>();
  const double* val = values.const_data_ptr<double>();
  const double ninf = -std::numeric_limits<double>::infinity();
  const int64_t rows = indices.size(0), k = indices.size(1);
  std::vector<int64_t> last_row(vocab, -1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t slot = 0; slot < k; ++slot) {
      const int64_t i = r * k + slot;
      if (val[i] == ninf) continue;
      const int64_t j = int64_t(idx[i]);
      TORCH_CHECK_INDEX(j >= 0 && j < vocab, "teacher_logits.indices (SparseTeacher) holds ", j, " at row ", r,
                        ", slot ", slot, ": out of range, expected a vocabulary index in [0, ", vocab, ")");
      TORCH_CHECK_VALUE(last_row[j] != r, "teacher_logits.indices (SparseTeacher) lists index ", j,
                        " twice in row ", r, "; each vocabulary index may appear once per row");
      last_row[j] = r;
    }
  }
}

SparseOutputs sparse_distill_rows_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                                      const std::optional<at::Tensor>& target,
                                      const std::optional<at::Tensor>& soft_mask, const at::Tensor& weights,
                                      double temperature, int64_t ignore_index, double label_smoothing,
                                      c10::string_view divergence, double beta, c10::string_view tail,
                                      bool student_grad) {
  const SparseCall call = prepare_sparse_call(student, indices, values, target, soft_mask, weights, temperature,
                                              label_smoothing, divergence, beta, tail);
  const int64_t rows = call.rows, vocab = call.vocab;
  const bool float64 = call.float64;
  const bool fp16_student = student_grad && student.scalar_type() == at::kHalf;
  const at::Tensor s = kernel_logits(student, float64, fp16_student);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor val = values.to(at::kDouble).contiguous();  // O(rows K): the teacher is small
  if (idx.scalar_type() == at::kLong) {
    check_indices<int64_t>(idx, val, vocab);
  } else {
    check_indices<int32_t>(idx, val, vocab);
  }
  at::Tensor y;
  if (target.has_value()) {
    y = target->to(at::kLong).contiguous();
    count_unmasked_rows(y, vocab, ignore_index);
  }
  const at::Tensor mask = soft_mask.has_value() ? soft_mask->contiguous() : at::Tensor();
  const at::Tensor w = weights.to(at::kDouble).contiguous();

  SparseArgs args;
  args.params = call.params;
  args.params.soft_weight = w.const_data_ptr<double>()[0];
  args.params.hard_weight = w.const_data_ptr<double>()[1];
  at::Tensor grad_s = student_grad ? empty_gradient(s.sizes(), s.scalar_type()) : at::empty({0}, student.options());
  std::vector<double> row_loss(rows), row_soft(rows), row_hard(rows);
  args.student = s.const_data_ptr();
  args.student_row_stride = s.stride(0);
  args.student_dtype = s.scalar_type();
  args.indices = idx.const_data_ptr();
  args.indices_int64 = idx.scalar_type() == at::kLong;
  args.values = val.const_data_ptr<double>();
  args.k = idx.size(1);
  args.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  args.ignore_index = ignore_index;
  args.soft_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  args.sparse = call.sparse;
  args.rows = rows;
  args.vocab = vocab;
  args.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
  args.row_loss = row_loss.data();
  args.row_soft = row_soft.data();
  args.row_hard = row_hard.data();
  if (rows > 0) select_sparse_kernel()(args);

  at::Tensor grad_scale = fp16_gradient_scales(fp16_student, 1, rows, student.options());
  if (fp16_student) grad_s = narrow_fp16_gradient(grad_s, grad_scale[0]);
  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  const at::ScalarType loss_dtype = float64 ? at::kDouble : at::kFloat;
  return {rows_tensor(row_loss, loss_dtype), rows_tensor(row_soft, loss_dtype), rows_tensor(row_hard, loss_dtype),
          grad_s, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_distill_rows", &sparse_distill_rows_cpu); }

}  // namespace fastkd::cpu
