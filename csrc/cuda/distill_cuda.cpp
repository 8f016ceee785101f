// CUDA implementation of the fastkd ops: checks, output allocation and the reductions around the
// kernels (csrc/cuda/*.cu). Nothing here waits for the device: the "mean" scale is counted on the
// device and read there by the kernel, so the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda/op_glue.h"
#include "cuda/launch.h"
#include "distill_op.h"

namespace fastkd::cuda {

namespace {

std::atomic<const char*> g_last_kernel{"none"};
std::atomic<int> g_last_cluster{0};

// FASTKD_CUDA_KERNEL=stream|resident forces a kernel (tests, benchmarks); read on every call.
KernelChoice kernel_choice() {
  const char* v = std::getenv("FASTKD_CUDA_KERNEL");
  if (v == nullptr) return KernelChoice::Auto;
  if (std::strcmp(v, "stream") == 0) return KernelChoice::Stream;
  if (std::strcmp(v, "resident") == 0) return KernelChoice::Resident;
  return KernelChoice::Auto;
}

// The current device's properties, read once per device (ATen/cuda/CUDAContext.h would do this but
// pulls in the cuSPARSE / cuBLAS headers, which a minimal toolkit lacks).
DeviceInfo device_info() {
  static std::mutex mu;
  static std::map<int, DeviceInfo> known;
  const int index = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(index);
  if (it != known.end()) return it->second;
  cudaDeviceProp prop{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  DeviceInfo d;
  d.index = index;
  d.major = prop.major;
  d.minor = prop.minor;
  d.sm_count = prop.multiProcessorCount;
  d.smem_per_sm = int64_t(prop.sharedMemPerMultiprocessor);
  d.smem_per_block_optin = int64_t(prop.sharedMemPerBlockOptin);
  d.kernel_image = kernel_image_available();
  known.emplace(index, d);
  return d;
}

// A GPU newer than every arch of the build (and no PTX it can JIT) raises NotImplementedError with a
// message fastkd/_cuda_fallback.py recognises, so Python can use the plain PyTorch loss instead.
DeviceInfo checked_device_info() {
  const DeviceInfo d = device_info();
  TORCH_CHECK_NOT_IMPLEMENTED(d.kernel_image, "fastkd: no CUDA kernel image for this GPU (sm_", d.major, d.minor,
                              "; this build has code for CUDA archs ", FASTKD_CUDA_ARCHS, ")");
  return d;
}

LaunchReport launch_rows(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::BFloat16: return launch_distill_bfloat16(a, dev, stream);
    case DType::Half: return launch_distill_half(a, dev, stream);
    case DType::Double: return launch_distill_double(a, dev, stream);
    default: return launch_distill_float(a, dev, stream);
  }
}

ForwardOutputs distill_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& target, double temperature, double alpha,
                                    int64_t ignore_index, double label_smoothing, bool scale_by_temperature_squared,
                                    c10::string_view reduction, int64_t batch_size, bool student_grad,
                                    bool teacher_grad) {
  const PreparedCall call =
      prepare_call(student, teacher, target, temperature, alpha, ignore_index, label_smoothing,
                   scale_by_temperature_squared, reduction, batch_size, student_grad, teacher_grad);
  // The kernels compute the soft term always (prepare_call sets has_soft: both terms are reported
  // even at weight 0) and the hard term when there is a target.
  TORCH_INTERNAL_ASSERT(call.params.has_soft, "fastkd CUDA kernels expect the soft term to be computed");
  const c10::cuda::CUDAGuard guard(student.device());
  const DeviceInfo dev = checked_device_info();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // A mixed pair runs in the wider type, as on the CPU.
  const at::ScalarType compute = compute_dtype(student, teacher, call.float64);
  const at::Tensor s = rows_view(student, compute);
  const at::Tensor t = rows_view(teacher, compute);
  at::Tensor y;
  if (target.has_value()) y = target->to(at::kLong).contiguous();

  const at::ScalarType loss_dtype = call.float64 ? at::kDouble : at::kFloat;
  const auto loss_opts = student.options().dtype(loss_dtype);
  at::Tensor grad_s = student_grad ? at::empty(s.sizes(), s.options()) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? at::empty(t.sizes(), t.options()) : at::empty({0}, teacher.options());

  const int64_t rows = call.rows;
  const bool per_row = call.reduction == Reduction::None;
  // Per-row terms: the outputs themselves for "none", else scratch for the reduction.
  const at::Tensor row_loss = at::empty({rows}, loss_opts);
  const at::Tensor row_soft = at::empty({rows}, loss_opts);
  const at::Tensor row_hard = at::empty({rows}, loss_opts);

  // The gradient scale of the reduction: on the device for "mean" over a target (counted there).
  at::Tensor scale_dev;
  double scale_host = 1.0;
  if (call.reduction == Reduction::Mean && y.defined()) {
    scale_dev = at::empty({1}, student.options().dtype(at::kDouble));
    if (rows > 0) {
      launch_mean_scale(y.const_data_ptr<int64_t>(), rows, ignore_index, scale_dev.data_ptr<double>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      scale_dev.fill_(1.0);
    }
  } else {
    scale_host = reduction_scale(call.reduction, rows, call.batch_size);
  }

  if (rows > 0) {
    DistillLaunch a;
    a.dtype = kernel_dtype(compute);
    a.student = s.const_data_ptr();
    a.teacher = t.const_data_ptr();
    a.student_row_stride = s.stride(0);
    a.teacher_row_stride = t.stride(0);
    a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
    a.ignore_index = ignore_index;
    a.rows = rows;
    a.vocab = call.vocab;
    a.params = call.params;
    a.scale_device = scale_dev.defined() ? scale_dev.const_data_ptr<double>() : nullptr;
    a.scale_host = scale_host;
    a.grad_student = student_grad ? grad_s.data_ptr() : nullptr;
    a.grad_teacher = teacher_grad ? grad_t.data_ptr() : nullptr;
    a.row_loss = row_loss.data_ptr();
    a.row_soft = row_soft.data_ptr();
    a.row_hard = row_hard.data_ptr();
    a.choice = kernel_choice();
    const LaunchReport report = launch_rows(a, dev, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    g_last_kernel.store(report.kernel);
    g_last_cluster.store(report.cluster);
  }

  at::Tensor loss = row_loss, soft_out = row_soft, hard_out = row_hard;
  if (!per_row) {
    loss = at::empty({}, loss_opts);
    soft_out = at::empty({}, loss_opts);
    hard_out = at::empty({}, loss_opts);
    launch_reduce_rows(row_loss.const_data_ptr(), row_soft.const_data_ptr(), row_hard.const_data_ptr(), rows,
                       call.float64, scale_dev.defined() ? scale_dev.const_data_ptr<double>() : nullptr, scale_host,
                       loss.data_ptr(), soft_out.data_ptr(), hard_out.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A float32 / half logit paired with another dtype was computed wider; its gradient goes back in
  // its own dtype.
  if (student_grad && grad_s.scalar_type() != student.scalar_type()) grad_s = grad_s.to(student.scalar_type());
  if (teacher_grad && grad_t.scalar_type() != teacher.scalar_type()) grad_t = grad_t.to(teacher.scalar_type());
  return {loss, soft_out, hard_out, grad_s, grad_t};
}

void scale_grad_cuda_(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  const bool per_row = grad_output.numel() != 1;
  if (per_row) {
    TORCH_CHECK_VALUE(grad.dim() >= 1 && grad_output.numel() == grad.size(0), "fastkd::scale_grad_: grad_output has ",
                      grad_output.numel(), " values for ", grad.dim() >= 1 ? grad.size(0) : 1, " rows");
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  (void)checked_device_info();
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor go = grad_output.to(grad.device(), acc).contiguous();
  if (!grad.is_contiguous() || !at::isFloatingType(grad.scalar_type()) ||
      (grad.scalar_type() != at::kFloat && grad.scalar_type() != at::kBFloat16 && grad.scalar_type() != at::kHalf &&
       grad.scalar_type() != at::kDouble)) {
    grad.mul_(per_row ? go.reshape({grad.size(0), 1}) : go.reshape({}));
    return;
  }
  const int64_t rows = per_row ? grad.size(0) : 1;
  launch_scale_grad(grad.data_ptr(), kernel_dtype(grad.scalar_type()), rows, grad.numel() / rows, go.const_data_ptr(),
                    per_row, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Which kernel the last CUDA call ran, for tests and benchmarks ("stream", "stream-warp",
// "resident-<CTAs per row>").
std::string last_kernel() {
  std::string name = g_last_kernel.load();
  if (name == "resident") name += "-" + std::to_string(g_last_cluster.load());
  return name;
}

// Whether this build has code the GPU `device` runs (machine code for its arch, or PTX the driver
// compiles): Python asks once per device, before it routes a loss to the ops (fastkd/_cuda_fallback.py).
bool kernel_image_available_on(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return device_info().kernel_image;
}

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("distill_forward", &distill_forward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda_);
}

}  // namespace fastkd::cuda
