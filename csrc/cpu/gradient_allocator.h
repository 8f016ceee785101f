// Allocation of the N x V gradient outputs on the CPU.
//
// A fresh gradient of a few hundred MB comes from mmap every step, and on the first write the kernel
// faults in and zeroes it 4 KiB at a time: on a typical VM that costs as much as computing the
// loss. Large gradients are therefore allocated 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so the
// same memory arrives in 512x fewer faults (it still counts as ordinary CPU tensor memory).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd::cpu {

class GradientAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kThreshold = size_t(8) << 20;  // below this, the default allocator

  c10::DataPtr allocate(size_t n) override {
#if defined(__linux__)
    if (n >= kThreshold) {
      const size_t rounded = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* ptr = nullptr;
      if (posix_memalign(&ptr, kHugePage, rounded) != 0) throw std::bad_alloc();
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: ignored where THP is off
      return {ptr, ptr, &std::free, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// An uninitialised CPU tensor like at::empty(sizes, dtype), from the allocator above.
inline at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  static GradientAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace fastkd::cpu
