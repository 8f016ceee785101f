// Host side of the distillation kernels for one logit type: picks the loss mode (soft / hard terms,
// T == 1 or 2 shortcuts), then the kernel: resident (row on chip, one HBM read) when the row fits in
// the shared memory of 1 to 16 CTAs with at least two CTAs per SM, else streaming (two reads, the
// second mostly from L2). Included once per type by distill_<type>.cu.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <type_traits>

#include "cuda/resident_kernel.cuh"
#include "cuda/stream_kernel.cuh"

namespace fastkd::cuda {

// Rows at most this long get one warp each in the streaming kernel.
constexpr int64_t kWarpRowMax = 1024;

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// What the resident kernel of one mode was compiled to on one device.
struct KernelFacts {
  int binary_version = 0;  // e.g. 90: the SASS the driver loaded for this device
  int ptx_version = 0;     // the virtual arch the code was compiled from (80 for compute_80 PTX JIT-ed on sm_90)
  int static_smem = 0;
  int64_t max_dynamic_smem = 48 * 1024;  // what the driver granted (48 KiB without the opt-in)
  bool large_clusters = false;            // clusters beyond the portable 8 CTAs were allowed
  // The cluster code (DSMEM, cluster barriers) is compiled in only for __CUDA_ARCH__ >= 900: SASS
  // for sm_90 built from compute_80 PTX has binaryVersion 90 but traps there.
  bool clusters() const { return binary_version >= 90 && ptx_version >= 90; }
};

template <class Kernel>
KernelFacts read_kernel_facts(Kernel kernel, int64_t optin) {
  cudaFuncAttributes attr{};
  KernelFacts f;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return f;
  }
  f.binary_version = attr.binaryVersion;
  f.ptx_version = attr.ptxVersion;
  f.static_smem = int(attr.sharedSizeBytes);
  // Allow the largest dynamic shared memory, and prefer shared memory over L1 (the kernel reads its
  // row from shared memory only). These attributes belong to the current device. A refusal (MPS, MIG
  // slices, green contexts may cap them) shrinks the plan instead of failing the launch.
  f.max_dynamic_smem = 48 * 1024 - f.static_smem;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(optin) - f.static_smem) ==
      cudaSuccess) {
    f.max_dynamic_smem = optin - f.static_smem;
  }
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);  // a hint only
  f.large_clusters =
      f.clusters() && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  (void)cudaGetLastError();
  return f;
}

// read_kernel_facts() once per (kernel, device): function attributes are set per device, so a
// second GPU in the process needs its own. A launch the driver refused marks the kernel off for
// good on that device (refuse_resident), so later calls stream without trying again.
struct KnownFacts {
  std::mutex mu;
  std::map<std::pair<const void*, int>, KernelFacts> facts;
  std::map<std::pair<const void*, int>, bool> refused;
};

inline KnownFacts& known_facts() {
  static KnownFacts known;
  return known;
}

template <class Kernel>
KernelFacts kernel_facts(Kernel kernel, const DeviceInfo& dev) {
  KnownFacts& known = known_facts();
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev.index);
  std::lock_guard<std::mutex> lock(known.mu);
  const auto it = known.facts.find(key);
  if (it != known.facts.end()) return it->second;
  const KernelFacts f = read_kernel_facts(kernel, dev.smem_per_block_optin);
  known.facts.emplace(key, f);
  return f;
}

template <class Kernel>
bool resident_refused(Kernel kernel, const DeviceInfo& dev) {
  KnownFacts& known = known_facts();
  std::lock_guard<std::mutex> lock(known.mu);
  return known.refused.count(std::make_pair(reinterpret_cast<const void*>(kernel), dev.index)) > 0;
}

template <class Kernel>
void refuse_resident(Kernel kernel, const DeviceInfo& dev) {
  KnownFacts& known = known_facts();
  std::lock_guard<std::mutex> lock(known.mu);
  known.refused[std::make_pair(reinterpret_cast<const void*>(kernel), dev.index)] = true;
}

// Whether clusters of `cl` CTAs with `bytes` of dynamic shared memory each can be resident at all on
// the current device (`device`).
template <class Kernel>
bool cluster_fits(Kernel kernel, int device, int cl, int64_t bytes) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int64_t>, bool> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, cl, bytes);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(cl), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = size_t(bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cl);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
  (void)cudaGetLastError();
  known.emplace(key, ok);
  return ok;
}

struct ResidentPlan {
  int cluster = 0;  // 0: the row cannot stay on chip
  int64_t slice = 0;
  int64_t bytes = 0;
};

// The smallest cluster whose slices fit three CTAs per SM, else two (enough to overlap one CTA's
// loads with another's math); none if even 16 CTAs cannot hold the row.
template <class X, class Kernel>
ResidentPlan plan_resident(Kernel kernel, const KernelFacts& f, int64_t vocab, int streams, const DeviceInfo& dev) {
  constexpr int N = kVecElems<X>;
  const bool clusters = dev.major >= 9 && f.clusters();
  const int64_t reserved = 1024 + f.static_smem;  // per CTA: the system's 1 KiB and our static arrays
  for (int per_sm : {3, 2}) {
    const int64_t budget = std::min(dev.smem_per_sm / per_sm - reserved, f.max_dynamic_smem);
    for (int cl : {1, 2, 4, 8, 16}) {
      if (cl > 1 && !clusters) break;
      if (cl > 8 && !f.large_clusters) break;
      const int64_t per_cta = (vocab + cl - 1) / cl;
      const int64_t slice = (per_cta + N - 1) / N * N;
      const int64_t bytes = slice * int64_t(sizeof(X)) * streams;
      if (bytes > budget) continue;
      if (cl > 1 && !cluster_fits(kernel, dev.index, cl, bytes)) continue;
      return {cl, slice, bytes};
    }
  }
  return {};
}

template <class X, bool kSoft, bool kHard, int kTMode>
LaunchReport launch_mode(KernelArgs k, const DeviceInfo& dev, cudaStream_t stream) {
  const DistillLaunch& a = k.a;
  constexpr int N = kVecElems<X>;
  // 16-byte chunks need every row start aligned: the base pointers and the row strides.
  k.vec = a.vocab % N == 0 && aligned16(a.student) && (!kSoft || aligned16(a.teacher)) &&
          a.student_row_stride % N == 0 && (!kSoft || a.teacher_row_stride % N == 0) &&
          aligned16(a.grad_student) && aligned16(a.grad_teacher);

  if constexpr (!std::is_same_v<X, double>) {
    const bool want = a.choice == KernelChoice::Resident || (a.choice == KernelChoice::Auto && a.vocab > kWarpRowMax);
    auto kernel = resident_kernel<X, kSoft, kHard, kTMode>;
    if (want && k.vec && !resident_refused(kernel, dev)) {
      const KernelFacts facts = kernel_facts(kernel, dev);
      const ResidentPlan plan = plan_resident<X>(kernel, facts, a.vocab, kSoft ? 2 : 1, dev);
      const int64_t blocks = a.rows * plan.cluster;
      if (plan.cluster > 0 && blocks <= int64_t(INT32_MAX)) {
        k.cluster = plan.cluster;
        k.slice = plan.slice;
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(unsigned(blocks), 1, 1);
        cfg.blockDim = dim3(kThreads, 1, 1);
        cfg.dynamicSmemBytes = size_t(plan.bytes);
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = unsigned(plan.cluster);
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = plan.cluster > 1 ? 1 : 0;
        // Refused (a cluster launch under MPS / MIG / green contexts, shared memory the partition lacks):
        // the streaming kernel runs instead, now and on later calls.
        if (cudaLaunchKernelEx(&cfg, kernel, k) == cudaSuccess) return {"resident", plan.cluster};
        (void)cudaGetLastError();
        refuse_resident(kernel, dev);
        k.cluster = 1;
        k.slice = 0;
      }
    }
  }

  k.warp_per_row = a.vocab <= kWarpRowMax;
  const int rows_per_block = k.warp_per_row ? kThreads / 32 : 1;
  const int64_t blocks = (a.rows + rows_per_block - 1) / rows_per_block;
  stream_kernel<X, kSoft, kHard, kTMode><<<unsigned(blocks), kThreads, 0, stream>>>(k);
  return {k.warp_per_row ? "stream-warp" : "stream", 0};
}

// The loss modes compiled: both terms (with the T = 1, 2, 4 shortcuts) or the soft term alone (no
// target). prepare_call() always computes the soft term (has_soft), so there is no hard-only mode.
template <class X>
LaunchReport launch_distill(const DistillLaunch& a, const DeviceInfo& dev, cudaStream_t stream) {
  KernelArgs k;
  k.a = a;
  const LossParams& p = a.params;
  if (!p.has_hard) return launch_mode<X, true, false, 0>(k, dev, stream);
  switch (p.integer_temperature) {
    case 1: return launch_mode<X, true, true, 1>(k, dev, stream);
    case 2: return launch_mode<X, true, true, 2>(k, dev, stream);
    case 4: return launch_mode<X, true, true, 4>(k, dev, stream);
    default: return launch_mode<X, true, true, 0>(k, dev, stream);
  }
}

}  // namespace fastkd::cuda
