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
using SparseOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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

bool is_logit_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble;
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
  const int64_t rows = student.size(0), vocab = student.size(1);
  check_row_inputs("fastkd::sparse_distill_rows", student, target, soft_mask);
#undef FASTKD_OP
  const DivergenceParams div = parse_divergence(divergence, beta);
  const bool float64 = student.scalar_type() == at::kDouble || values.scalar_type() == at::kDouble;
  const at::Tensor s = kernel_view(student, float64);
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
  args.params.inv_temperature = 1.0 / temperature;
  args.params.label_smoothing = label_smoothing;
  args.params.vocab = vocab;
  args.params.has_hard = target.has_value();
  args.params.integer_temperature = temperature == 1.0 || temperature == 2.0 || temperature == 4.0 ? int(temperature) : 0;
  args.params.soft_weight = w.const_data_ptr<double>()[0];
  args.params.hard_weight = w.const_data_ptr<double>()[1];
  const double prescale = fp16_prescale(student_grad && student.scalar_type() == at::kHalf, args.params.soft_weight,
                                        args.params.hard_weight, args.params.inv_temperature, div);
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
  args.divergence = div;
  args.full_forward_kl = divergence == "forward_kl";  // jsd / skew at beta = 0 use the support rule
  args.bucket = tail == "bucket";
  args.rows = rows;
  args.vocab = vocab;
  args.grad_scale = prescale;
  args.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
  args.row_loss = row_loss.data();
  args.row_soft = row_soft.data();
  args.row_hard = row_hard.data();
  if (rows > 0) select_sparse_kernel()(args);

  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  const at::ScalarType loss_dtype = float64 ? at::kDouble : at::kFloat;
  return {rows_tensor(row_loss, loss_dtype), rows_tensor(row_soft, loss_dtype), rows_tensor(row_hard, loss_dtype),
          grad_s, at::scalar_tensor(prescale, at::TensorOptions().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_distill_rows", &sparse_distill_rows_cpu); }

}  // namespace fastkd::cpu
