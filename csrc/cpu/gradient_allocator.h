// Allocation of the N x V gradient outputs on the CPU.
//
// A fresh gradient of a few hundred MB comes from mmap every step, and the first write faults it in
// and zeroes it 4 KiB at a time: on a typical VM that costs as much as computing the loss. A training
// loop frees each step's gradient (zero_grad) just before the next step asks for one of the same
// size, so the allocator keeps the one most recently freed large block and hands it out again, pages
// already mapped. It holds at most one block, and only while no gradient is alive to use it.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <mutex>
#include <new>

namespace fastkd::cpu {

class GradientAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kThreshold = size_t(8) << 20;  // below this, the default allocator
  static constexpr size_t kAlignment = 4096;

  c10::DataPtr allocate(size_t n) override {
    if (n < kThreshold) return c10::GetCPUAllocator()->allocate(n);
    Block* block = take_cached(n);
    if (block == nullptr) {
      void* ptr = nullptr;
      if (posix_memalign(&ptr, kAlignment, n) != 0) throw std::bad_alloc();
      block = new Block{ptr, n};
    }
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static Block*& cached() {
    static Block* block = nullptr;
    return block;
  }

  static void destroy(Block* block) {
    std::free(block->ptr);
    delete block;
  }

  // The cached block if it fits n without wasting more than half of it; a misfit is freed.
  static Block* take_cached(size_t n) {
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex());
      std::swap(block, cached());
    }
    if (block != nullptr && (block->size < n || block->size > 2 * n)) {
      destroy(block);
      block = nullptr;
    }
    return block;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    {
      std::lock_guard<std::mutex> lock(mutex());
      if (cached() == nullptr) {
        cached() = block;
        return;
      }
    }
    destroy(block);
  }
};

// An uninitialised CPU tensor like at::empty(sizes, dtype), from the allocator above.
inline at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  static GradientAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace fastkd::cpu
