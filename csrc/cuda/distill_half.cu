// The distillation kernels for half logits (one file per type, so the types compile in parallel).
#include "cuda/distill_dispatch.cuh"

namespace fastkd::cuda {

LaunchReport launch_distill_half(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream) {
  return launch_distill<__half>(a, dev, stream);
}

}  // namespace fastkd::cuda
