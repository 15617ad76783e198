/*
 * splat_cuda.cu -- tile-based Gaussian rasterizer for NVIDIA GPUs, forward and backward.
 *
 * The same algorithm as splat_cpu.cpp, on the same per-pixel math (splat_kernel.h) and argument checks
 * (splat_checks.h); checked against `rasterize_torch` in splat.py (the spec) by tests/test_splat_backends.py,
 * on a GPU and, on every machine, under cuda_sim.h, which runs this very file on the CPU one GPU thread at a
 * time (backend "cuda-sim", tests/test_cuda_sim.py).
 *
 *   1. bin:      one thread per Gaussian counts the 16 x 16 tiles its culling box meets; a prefix sum gives
 *                each Gaussian its slots; a second pass writes (image * n_tiles + tile, Gaussian) pairs,
 *                visiting Gaussians front to back. A stable sort on the key groups the pairs by tile and
 *                keeps them front to back inside a tile (the depth order of the reference, ties by index):
 *                    tile_offsets [B * n_tiles + 1] (int64),  tile_ids [n_entries] (int32 Gaussian index)
 *   2. forward:  one block of 16 x 16 threads per (image, tile), one thread per pixel. The block stages
 *                the tile's Gaussians in shared memory 256 at a time; each thread composites its pixel and
 *                the block stops as soon as every pixel is saturated. Saved: final_T, n_contrib.
 *   3. backward: same blocks, walking the staged batches back to front. Each thread computes its pixel's
 *                share of dL/d(Gaussian) (splat_kernel.h); a warp sums the shares with __shfl_down_sync and
 *                one lane does the atomicAdd, so each gradient entry of a Gaussian takes at most 8 atomics
 *                per block (one per warp with a hit), not 256. The summation order, so the float rounding,
 *                varies between runs, unlike the CPU kernel's fixed order.
 */
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "splat_checks.h"
#include "splat_kernel.h"

// The only lines that differ when splat_cuda_sim.cpp compiles this file as C++ for the CPU, where cuda_sim.h
// runs the kernels thread by thread (backend "cuda-sim": tests, docs/walkthrough.md 6). Every launch goes
// through launch().
#ifdef SPLAT_CUDA_SIM
#include "cuda_sim.h"
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
using cuda_sim::launch;
constexpr c10::DeviceType DEVICE = at::kCPU;
constexpr const char* BACKEND = "cuda-sim";
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, cudaStream_t stream, Args... args) {
  kernel<<<blocks, threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
constexpr c10::DeviceType DEVICE = at::kCUDA;
constexpr const char* BACKEND = "cuda";
#endif

namespace {

using splat::Gaussian2D;
using splat::Grid;
using splat::inputs;
using splat::Inputs;
using splat::TILE;
constexpr int BLOCK = TILE * TILE;  // threads per block = pixels per tile = Gaussians per staged batch
constexpr int THREADS_1D = 256;     // for the per-Gaussian binning kernels

int blocks_for(int64_t n) { return int((n + THREADS_1D - 1) / THREADS_1D); }

// ----- 1. binning --------------------------------------------------------------------------------------------

// Tiles met by the Gaussian at depth rank r of image b (thread i = b * K + r): its tile range, kept in
// tile_rects [B * K, 4] so the second pass cannot disagree with the count, and how many tiles that is.
template <typename scalar_t>
__global__ void count_tiles_kernel(Inputs<scalar_t> in, const int64_t* order, int B, int K, Grid grid,
                                   int32_t* tile_rects, int64_t* counts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(B) * K) return;
  splat::PixelRect r;
  int32_t* rect = tile_rects + 4 * i;
  if (splat::pixel_rect(in.gaussian(i / K * K + order[i]), grid.H, grid.W, r)) {
    rect[0] = r.x0 / TILE, rect[1] = r.x1 / TILE, rect[2] = r.y0 / TILE, rect[3] = r.y1 / TILE;
    counts[i] = int64_t(rect[1] - rect[0] + 1) * (rect[3] - rect[2] + 1);
  } else {
    rect[0] = 0, rect[1] = -1, rect[2] = 0, rect[3] = -1;  // empty
    counts[i] = 0;
  }
}

// Writes the (tile key, Gaussian) pairs of rank i into its slots [ends[i] - counts[i], ends[i]).
__global__ void emit_pairs_kernel(const int64_t* order, int B, int K, Grid grid, const int32_t* tile_rects,
                                  const int64_t* ends, int64_t* keys, int32_t* values) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(B) * K) return;
  const int32_t* rect = tile_rects + 4 * i;
  int64_t slot = i == 0 ? 0 : ends[i - 1];
  for (int ty = rect[2]; ty <= rect[3]; ++ty)
    for (int tx = rect[0]; tx <= rect[1]; ++tx, ++slot) {
      keys[slot] = i / K * grid.n_tiles() + ty * grid.tiles_x + tx;
      values[slot] = int32_t(order[i]);
    }
}

template <typename scalar_t>
std::vector<at::Tensor> bin_gaussians(const Inputs<scalar_t>& in, const at::Tensor& order, int B, int K,
                                      const Grid& grid, cudaStream_t stream) {
  const int64_t n = int64_t(B) * K;
  const auto long_opts = order.options();
  if (n == 0)  // no Gaussians: every tile list is empty
    return {at::zeros({int64_t(B) * grid.n_tiles() + 1}, long_opts), at::empty({0}, long_opts.dtype(at::kInt))};
  at::Tensor tile_rects = at::empty({n, 4}, long_opts.dtype(at::kInt));
  at::Tensor counts = at::empty({n}, long_opts);
  launch(count_tiles_kernel<scalar_t>, blocks_for(n), THREADS_1D, stream, in, order.data_ptr<int64_t>(), B, K, grid,
         tile_rects.data_ptr<int32_t>(), counts.data_ptr<int64_t>());
  const at::Tensor ends = at::cumsum(counts, 0);  // inclusive prefix sum: one past each Gaussian's last slot
  // A host sync every forward (the other is splat.check_opacity): the pair count sizes the buffers below, so
  // the CPU waits here for the counting kernel and the GPU queue drains. Not yet measured; to be measured on
  // a GPU with bench.py --device cuda before anything is changed (an upper bound on the count would avoid it).
  const int64_t total = ends[n - 1].item<int64_t>();
  at::Tensor keys = at::empty({total}, long_opts);
  at::Tensor values = at::empty({total}, long_opts.dtype(at::kInt));
  launch(emit_pairs_kernel, blocks_for(n), THREADS_1D, stream, order.data_ptr<int64_t>(), B, K, grid,
         tile_rects.data_ptr<int32_t>(), ends.data_ptr<int64_t>(), keys.data_ptr<int64_t>(), values.data_ptr<int32_t>());
  // Stable: pairs were written front to back, so each tile's run stays in depth order.
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor tile_ids = values.index_select(0, std::get<1>(sorted));
  // The run of tile t starts at the first key >= t.
  const at::Tensor tile_offsets =
      at::searchsorted(std::get<0>(sorted), at::arange(int64_t(B) * grid.n_tiles() + 1, long_opts));
  return {tile_offsets, tile_ids};
}

// ----- 2. forward --------------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(BLOCK)
    forward_kernel(Inputs<scalar_t> in, const int64_t* tile_offsets, const int32_t* tile_ids, int K, Grid grid,
                   scalar_t background, scalar_t* image, scalar_t* final_T, int32_t* n_contrib) {
  __shared__ Gaussian2D<scalar_t> staged[BLOCK];
  const int job = blockIdx.x, b = job / grid.n_tiles(), tile = job % grid.n_tiles();
  const int x = (tile % grid.tiles_x) * TILE + threadIdx.x % TILE;
  const int y = (tile / grid.tiles_x) * TILE + threadIdx.x / TILE;
  const bool inside = x < grid.W && y < grid.H;
  const int64_t begin = tile_offsets[job], end = tile_offsets[job + 1];
  const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);

  scalar_t T = scalar_t(1), C[3] = {scalar_t(0), scalar_t(0), scalar_t(0)};
  int n_used = 0;
  bool done = !inside;
  for (int64_t batch = begin; batch < end; batch += BLOCK) {
    // Also the barrier that keeps the previous batch in shared memory until every thread is through it.
    if (__syncthreads_count(done) == BLOCK) break;
    if (batch + threadIdx.x < end) staged[threadIdx.x] = in.gaussian(int64_t(b) * K + tile_ids[batch + threadIdx.x]);
    __syncthreads();
    const int n = int(min(int64_t(BLOCK), end - batch));
    for (int i = 0; i < n && !done; ++i) {
      splat::Hit<scalar_t> h;
      if (!splat::evaluate(staged[i], px, py, h)) continue;
      if (splat::blend(staged[i], h.alpha, T, C))
        n_used = int(batch - begin) + i + 1;
      else
        done = true;  // saturated: early stop
    }
  }
  if (!inside) return;
  const int64_t HW = int64_t(grid.H) * grid.W, p = int64_t(y) * grid.W + x;
  for (int ch = 0; ch < 3; ++ch) image[(int64_t(b) * 3 + ch) * HW + p] = C[ch] + T * background;
  final_T[b * HW + p] = T;
  n_contrib[b * HW + p] = n_used;
}

// ----- 3. backward -------------------------------------------------------------------------------------------

// Sum of v over the 32 lanes of a warp, added to *out by lane 0: one atomic per warp instead of 32.
template <typename scalar_t>
__device__ __forceinline__ void warp_add(scalar_t v, scalar_t* out) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) atomicAdd(out, v);
}

template <typename scalar_t>
__global__ void __launch_bounds__(BLOCK)
    backward_kernel(Inputs<scalar_t> in, const int64_t* tile_offsets, const int32_t* tile_ids, int K, Grid grid,
                    scalar_t background, const scalar_t* final_T, const int32_t* n_contrib,
                    const scalar_t* grad_image, scalar_t* grads) {
  __shared__ Gaussian2D<scalar_t> staged[BLOCK];
  __shared__ int32_t staged_id[BLOCK];
  __shared__ int block_last;
  const int job = blockIdx.x, b = job / grid.n_tiles(), tile = job % grid.n_tiles();
  const int x = (tile % grid.tiles_x) * TILE + threadIdx.x % TILE;
  const int y = (tile / grid.tiles_x) * TILE + threadIdx.x / TILE;
  const bool inside = x < grid.W && y < grid.H;
  const int64_t begin = tile_offsets[job];
  const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);
  const int64_t HW = int64_t(grid.H) * grid.W, p = int64_t(y) * grid.W + x;

  // Per-pixel state, back to front: T_{i+1}, S_i (splat_kernel.h), dL/dC, and where the walk starts.
  scalar_t T = scalar_t(0), S[3] = {}, dL_dC[3] = {};  // pixels outside the image stay at zero
  int n_used = 0;
  if (inside) {
    T = final_T[b * HW + p];
    n_used = n_contrib[b * HW + p];
    for (int ch = 0; ch < 3; ++ch) {
      S[ch] = T * background;  // behind the last contributor there is only the background
      dL_dC[ch] = grad_image[(int64_t(b) * 3 + ch) * HW + p];
    }
  }
  if (threadIdx.x == 0) block_last = 0;
  __syncthreads();
  atomicMax(&block_last, n_used);
  __syncthreads();

  for (int batch_end = block_last; batch_end > 0; batch_end -= BLOCK) {
    const int batch_begin = max(0, batch_end - BLOCK);
    __syncthreads();  // everyone is done with the previous batch
    if (batch_begin + int(threadIdx.x) < batch_end) {
      const int32_t k = tile_ids[begin + batch_begin + threadIdx.x];
      staged[threadIdx.x] = in.gaussian(int64_t(b) * K + k);
      staged_id[threadIdx.x] = k;
    }
    __syncthreads();
    for (int i = batch_end - batch_begin - 1; i >= 0; --i) {
      const Gaussian2D<scalar_t>& g = staged[i];
      splat::Hit<scalar_t> h;
      const bool hit = batch_begin + i < n_used && splat::evaluate(g, px, py, h);
      // Every lane takes part in the shuffles; lanes without a hit add zeros.
      if (!__any_sync(0xffffffffu, hit)) continue;
      const Gaussian2D<scalar_t> d =
          hit ? splat::blend_backward(g, h, true, dL_dC, T, S) : splat::zero_gaussian<scalar_t>();
      scalar_t* out = grads + (int64_t(b) * K + staged_id[i]) * splat::GRAD_DIM;  // [u, v, a, b, c, o, rgb]
      warp_add(d.u, out + 0), warp_add(d.v, out + 1);
      warp_add(d.a, out + 2), warp_add(d.b, out + 3), warp_add(d.c, out + 4);
      warp_add(d.opacity, out + 5);
      warp_add(d.rgb[0], out + 6), warp_add(d.rgb[1], out + 7), warp_add(d.rgb[2], out + 8);
    }
  }
}

// ----- Python entry points -----------------------------------------------------------------------------------

// Same signature and outputs as splat_cpu.cpp's forward.
std::vector<at::Tensor> forward(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                                const at::Tensor& opacity, const at::Tensor& order, int64_t H, int64_t W,
                                double background) {
  splat::check_inputs(means2d, conic, rgb, opacity, DEVICE, BACKEND);
  splat::check_order(order, means2d, opacity);
  TORCH_CHECK(H > 0 && W > 0, "image size must be positive, got ", H, " x ", W);
  const DeviceGuard guard(means2d.device());
  const cudaStream_t stream = current_stream();
  const int B = int(means2d.size(0)), K = int(means2d.size(1));
  const Grid grid = splat::make_grid(int(H), int(W));
  const auto options = means2d.options();
  at::Tensor image = at::empty({B, 3, H, W}, options);
  at::Tensor final_T = at::empty({B, H, W}, options);
  at::Tensor n_contrib = at::empty({B, H, W}, options.dtype(at::kInt));
  std::vector<at::Tensor> lists;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "splat_cuda_forward", [&] {
    const auto in = inputs<scalar_t>(means2d, conic, rgb, opacity);
    lists = bin_gaussians(in, order, B, K, grid, stream);
    if (int64_t(B) * grid.n_tiles() == 0) return;
    launch(forward_kernel<scalar_t>, B * grid.n_tiles(), BLOCK, stream, in, lists[0].data_ptr<int64_t>(),
           lists[1].data_ptr<int32_t>(), K, grid, scalar_t(background), image.data_ptr<scalar_t>(),
           final_T.data_ptr<scalar_t>(), n_contrib.data_ptr<int32_t>());
  });
  return {image, final_T, n_contrib, lists[0], lists[1]};
}

// Same signature and output as splat_cpu.cpp's backward: grads [B, K, 9].
at::Tensor backward(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                    const at::Tensor& opacity, const at::Tensor& final_T, const at::Tensor& n_contrib,
                    const at::Tensor& tile_offsets, const at::Tensor& tile_ids, const at::Tensor& grad_image,
                    double background) {
  splat::check_inputs(means2d, conic, rgb, opacity, DEVICE, BACKEND);
  // Sizes, dtypes, devices and layout only: checking the offsets' values would cost a device-to-host copy.
  splat::check_saved(means2d, final_T, n_contrib, tile_offsets, tile_ids, grad_image);
  const DeviceGuard guard(means2d.device());
  const cudaStream_t stream = current_stream();
  const int B = int(means2d.size(0)), K = int(means2d.size(1));
  const int H = int(final_T.size(1)), W = int(final_T.size(2));
  const Grid grid = splat::make_grid(H, W);
  at::Tensor grads = at::zeros({B, K, splat::GRAD_DIM}, means2d.options());
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "splat_cuda_backward", [&] {
    if (int64_t(B) * grid.n_tiles() == 0) return;
    launch(backward_kernel<scalar_t>, B * grid.n_tiles(), BLOCK, stream, inputs<scalar_t>(means2d, conic, rgb, opacity),
           tile_offsets.data_ptr<int64_t>(), tile_ids.data_ptr<int32_t>(), K, grid, scalar_t(background),
           final_T.data_ptr<scalar_t>(), n_contrib.data_ptr<int32_t>(), grad_image.data_ptr<scalar_t>(),
           grads.data_ptr<scalar_t>());
  });
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tile-based Gaussian rasterizer, CUDA (see splat_cuda.cu)";
  m.def("forward", &forward, "means2d, conic, rgb, opacity, order, H, W, background -> "
                             "image, final_T, n_contrib, tile_offsets, tile_ids");
  m.def("backward", &backward, "inputs, saved tensors, grad_image, background -> grads [B, K, 9]");
}
