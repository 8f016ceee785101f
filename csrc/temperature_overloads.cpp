// Kernels of the .temperature_tensor overloads (csrc/ops.cpp), one for every op and backend: the
// temperature is read on the host from its 0-d CPU tensor, and the call goes on to the float overload's
// kernel for the same backend. A device tensor is refused rather than read: that read would wait for
// the device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace fastkd {
namespace {

double host_temperature(const c10::FunctionSchema& op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 && t.is_floating_point() && t.device().is_cpu(), op.name(), ".",
                    op.overload_name(), ": temperature must be a 0-d floating-point CPU tensor, got a ", t.scalar_type(),
                    " tensor of shape ", t.sizes(), " on ", t.device());
  return t.item<double>();
}

void call_with_host_temperature(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const auto index = schema.argumentIndexWithName("temperature");
  TORCH_INTERNAL_ASSERT(index.has_value(), schema.name(), " has no temperature argument");
  c10::IValue& temperature = (*stack)[stack->size() - schema.arguments().size() + *index];
  temperature = host_temperature(schema, temperature.toTensor());
  c10::Dispatcher::singleton().findSchemaOrThrow(schema.name().c_str(), "").redispatchBoxed(keys, stack);
}

void register_overloads(torch::Library& m) {
  for (const char* name : {"distill_forward.temperature_tensor", "distill_rows.temperature_tensor",
                           "sparse_distill_rows.temperature_tensor"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_with_host_temperature>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { register_overloads(m); }

#if FASTKD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { register_overloads(m); }
#endif

}  // namespace fastkd
