// The distillation kernels for double logits (one file per type, so the types compile in parallel).
#include "cuda/distill_dispatch.cuh"

namespace fastkd::cuda {

LaunchReport launch_distill_double(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream) {
  return launch_distill<double>(a, dev, stream);
}

}  // namespace fastkd::cuda
