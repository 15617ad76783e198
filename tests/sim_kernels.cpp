// Small CUDA kernels for tests/test_cuda_sim.py, run by cuda_sim.h: each one shows a thing the simulator must get
// right (a barrier, a shuffle, a mask) or a mistake it must expose (a missing barrier, a wrong shuffle offset, a
// divergent barrier). Compiled by the test with the system C++ compiler and called through ctypes; a launch that
// fails writes its message to `error` and returns 1.
#include <cstdio>
#include <stdexcept>

#include "cuda_sim.h"

namespace {

// Each thread writes its slot of shared memory, then reads the slot 32 up, which the next warp writes: only the
// barrier between the two makes that write visible.
__global__ void neighbour_warp_kernel(const float* in, float* out, int sync) {
  __shared__ float slots[1024];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  slots[threadIdx.x] = in[i];
  if (sync) __syncthreads();
  out[i] = slots[(threadIdx.x + 32) % blockDim.x];
}

// Lane 0 of each warp writes the sum of the warp's 32 values when the shuffles start at offset 16; started at 8,
// as if the warp had 16 lanes, it writes the sum of lanes 0-15 only.
__global__ void warp_sum_kernel(const float* in, float* out, int first_offset) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = in[i];
  for (int offset = first_offset; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) out[i / 32] = v;
}

// Each half warp sums its 16 values under its own mask; lanes 0 and 16 write them. Lanes 8-15 read lanes 16-23,
// outside their mask, and get junk that lane 0's sum never uses. The vote says whether any lane of the half
// holds a negative value.
__global__ void half_warp_kernel(const float* in, float* sums, int* any_negative) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  float v = in[i];
  const int negative = __any_sync(mask, v < 0);
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_down_sync(mask, v, offset);
  if (lane % 16 == 0) sums[i / 16] = v, any_negative[i / 16] = negative;
}

// Block sums with __syncthreads_count and an atomicAdd per warp into one total, and the block's largest value
// with atomicMax into shared memory.
__global__ void block_stats_kernel(const int* in, double* total, int* counts, int* maxima) {
  __shared__ int largest;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) largest = -1;
  __syncthreads();
  atomicMax(&largest, in[i]);
  double v = in[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) atomicAdd(total, v);
  const int odd = __syncthreads_count(in[i] % 2);
  if (threadIdx.x == 0) counts[blockIdx.x] = odd, maxima[blockIdx.x] = largest;
}

// Undefined behaviour, by `kind`: 0 a barrier only half the block reaches; 1 a full-mask shuffle that lane 31 has
// left; 2 a shuffle whose mask leaves out the lanes calling it; 3 a shuffle that half a warp waits at while the
// other half waits at a barrier; 4 two halves of the block at two different barriers.
__global__ void undefined_kernel(float* out, int kind) {
  const int lane = threadIdx.x % 32;
  float v = float(threadIdx.x);
  if (kind == 0 && threadIdx.x < blockDim.x / 2) __syncthreads();
  if (kind == 1 && lane == 31) return;
  if (kind == 1) v += __shfl_down_sync(0xffffffffu, v, 1);
  if (kind == 2) v += __shfl_down_sync(0x1u, v, 1);
  if (kind == 3 && lane < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
  if (kind == 3) __syncthreads();
  if (kind == 4) {
    if (threadIdx.x < blockDim.x / 2)
      __syncthreads();
    else
      __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

template <typename F>
int guarded(F launch, char* error, int size) {
  try {
    launch();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, size_t(size), "%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" {
int neighbour_warp(int blocks, int threads, const float* in, float* out, int sync, char* error, int size) {
  return guarded([&] { cuda_sim::launch(neighbour_warp_kernel, blocks, threads, nullptr, in, out, sync); }, error, size);
}
int warp_sum(int blocks, int threads, const float* in, float* out, int first_offset, char* error, int size) {
  return guarded([&] { cuda_sim::launch(warp_sum_kernel, blocks, threads, nullptr, in, out, first_offset); }, error,
                 size);
}
int half_warp(int blocks, int threads, const float* in, float* sums, int* any_negative, char* error, int size) {
  return guarded([&] { cuda_sim::launch(half_warp_kernel, blocks, threads, nullptr, in, sums, any_negative); }, error,
                 size);
}
int block_stats(int blocks, int threads, const int* in, double* total, int* counts, int* maxima, char* error,
                int size) {
  return guarded([&] { cuda_sim::launch(block_stats_kernel, blocks, threads, nullptr, in, total, counts, maxima); },
                 error, size);
}
int undefined(int blocks, int threads, float* out, int kind, char* error, int size) {
  return guarded([&] { cuda_sim::launch(undefined_kernel, blocks, threads, nullptr, out, kind); }, error, size);
}
}
