// CPU emulation of the small CUDA subset the memkd kernels use, so that their indexing, masking
// and __syncthreads discipline can be tested on machines without a GPU. Never part of the built
// extension: the kernel headers include it only when MEMKD_CUDA_EMULATION is defined, by a test
// harness that compiles them with a host compiler and runs every block of a launch one after the
// other, each with blockDim real threads that meet at a std::barrier for __syncthreads.
//
// Emulated: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, dynamic shared memory (poisoned
// with NaN bytes before every block, so a read of an unwritten value shows), float4/double2
// vector loads (alignment asserted). Not emulated (so a kernel using them fails to compile here):
// static __shared__ arrays, warp shuffles and votes, atomics.
#pragma once

#include <barrier>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

namespace memkd_emu {

struct LaunchState {
  dim3 grid, block;
  std::barrier<>* barrier = nullptr;
  unsigned char* shared = nullptr;
};
inline LaunchState& state() {
  static LaunchState s;
  return s;
}
inline thread_local dim3 thread_idx, block_idx;

inline long env_or(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stol(v) : fallback;
}

// Runs kernel(args...) over the grid: blocks in order, blockDim threads per block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  const size_t bytes = (shared_bytes + 63) / 64 * 64 + 64;
  unsigned char* shared = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
  std::barrier<> barrier(threads);
  LaunchState& s = state();
  s.grid = grid;
  s.block = block;
  s.barrier = &barrier;
  s.shared = shared;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0) std::memset(shared, 0xFF, bytes);  // NaN in every float and double
            barrier.arrive_and_wait();
            block_idx = dim3(x, y, z);
            kernel(args...);
            barrier.arrive_and_wait();
          }
    });
  }
  for (auto& th : pool) th.join();
  std::free(shared);
  s.barrier = nullptr;
  s.shared = nullptr;
}

}  // namespace memkd_emu

#define threadIdx (::memkd_emu::thread_idx)
#define blockIdx (::memkd_emu::block_idx)
#define blockDim (::memkd_emu::state().block)
#define gridDim (::memkd_emu::state().grid)
#define __syncthreads() (::memkd_emu::state().barrier->arrive_and_wait())
