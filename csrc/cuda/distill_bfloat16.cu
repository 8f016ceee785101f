// The distillation kernels for bfloat16 logits (one file per type, so the types compile in parallel).
#include "cuda/distill_dispatch.cuh"

namespace fastkd::cuda {

LaunchReport launch_distill_bfloat16(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream) {
  return launch_distill<__nv_bfloat16>(a, dev, stream);
}

}  // namespace fastkd::cuda
