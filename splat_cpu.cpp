/*
 * splat_cpu.cpp -- tile-based Gaussian rasterizer for the CPU (OpenMP), forward and backward.
 *
 * Same result as `rasterize_torch` in splat.py (the spec) up to float rounding; the per-pixel math is in
 * splat_kernel.h and the entry points' argument checks in splat_checks.h, both shared with splat_cuda.cu.
 * Three stages:
 *
 *   1. bin:      every Gaussian's culling box -> the 16 x 16 tiles it meets. Count per tile, prefix-sum,
 *                fill in depth order, so each tile's list is already sorted front to back:
 *                    tile_offsets [B * n_tiles + 1] (int64),  tile_ids [n_entries] (int32 Gaussian index)
 *   2. forward:  one (image, tile) per OpenMP task. The tile's Gaussians are copied into a contiguous
 *                buffer; the tile keeps T and C for its 256 pixels and takes the Gaussians front to back,
 *                each over the rows of its culling box only. A pixel stops when T would reach 1e-4 and
 *                the tile stops when all its pixels have. Per pixel this is exactly the loop of docs/design.md 3.
 *                Saved for backward: final_T [B, H, W] and n_contrib [B, H, W] (list entries up to and
 *                including the last contributor) -- never a per-pixel list.
 *   3. backward: the same tiles, Gaussians back to front from the last contributor, each pixel recovering
 *                its T (splat_kernel.h). Each tile writes the gradients of its list entries into its own
 *                rows of a [n_entries, 9] buffer (no two tasks share a row: no races, no atomics, and a
 *                fixed sum order, so results do not depend on the thread count); one pass per image then
 *                adds the rows into [B, K, 9].
 *
 * Cost: O(pixels x Gaussians whose box covers the pixel), instead of the reference's O(pixels x K).
 * Speed comes from SIMD: the loop over one row of a Gaussian's box keeps each pixel's state in its own array
 * slot, and splat_kernel.h's evaluate / blend / blend_backward are branch-free, so the compiler runs 4 or 8
 * pixels at once (splat.py builds with AVX2 + FMA where the CPU has them; -fno-trapping-math is what lets
 * GCC turn the selects into vector blends). Measured at 512 Gaussians per 32 px image, batch 32, 2 threads:
 * forward + backward 41 ms scalar, 17 ms with AVX2 (bench.py --per-token laptop gives the step ratios).
 * Built on first use by splat.py (torch.utils.cpp_extension.load); float32 and float64.
 */
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "splat_checks.h"
#include "splat_kernel.h"

namespace {

using splat::Gaussian2D;
using splat::Grid;
using splat::inputs;
using splat::Inputs;
using splat::TILE;

// Stage 1: per-tile lists of Gaussian indices, each in depth order (order [B, K] = depth argsort).
template <typename scalar_t>
std::vector<at::Tensor> bin_gaussians(const Inputs<scalar_t>& in, const int64_t* order, int B, int K,
                                      const Grid& grid) {
  const int n_tiles = grid.n_tiles();
  std::vector<splat::PixelRect> rects(size_t(B) * K);
  std::vector<char> visible(size_t(B) * K);
  std::vector<int64_t> counts(size_t(B) * n_tiles + 1, 0);

#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    int64_t* count = counts.data() + size_t(b) * n_tiles;
    for (int k = 0; k < K; ++k) {
      splat::PixelRect& r = rects[size_t(b) * K + k];
      visible[size_t(b) * K + k] = splat::pixel_rect(in.gaussian(int64_t(b) * K + k), grid.H, grid.W, r);
      if (!visible[size_t(b) * K + k]) continue;
      for (int ty = r.y0 / TILE; ty <= r.y1 / TILE; ++ty)
        for (int tx = r.x0 / TILE; tx <= r.x1 / TILE; ++tx) ++count[ty * grid.tiles_x + tx];
    }
  }

  // Exclusive prefix sum over (image, tile): where each tile's list starts.
  at::Tensor tile_offsets = at::empty({int64_t(B) * n_tiles + 1}, at::kLong);
  int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  offsets[0] = 0;
  for (size_t t = 0; t < size_t(B) * n_tiles; ++t) offsets[t + 1] = offsets[t] + counts[t];
  at::Tensor tile_ids = at::empty({offsets[size_t(B) * n_tiles]}, at::kInt);
  int32_t* ids = tile_ids.data_ptr<int32_t>();

#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    std::vector<int64_t> cursor(offsets + size_t(b) * n_tiles, offsets + size_t(b + 1) * n_tiles);
    for (int rank = 0; rank < K; ++rank) {  // front to back, so every list comes out sorted
      const int k = int(order[int64_t(b) * K + rank]);
      if (!visible[size_t(b) * K + k]) continue;
      const splat::PixelRect& r = rects[size_t(b) * K + k];
      for (int ty = r.y0 / TILE; ty <= r.y1 / TILE; ++ty)
        for (int tx = r.x0 / TILE; tx <= r.x1 / TILE; ++tx) ids[cursor[ty * grid.tiles_x + tx]++] = k;
    }
  }
  return {tile_offsets, tile_ids};
}

// The Gaussians of one tile, copied out in list (depth) order so the loops below stream through memory.
template <typename scalar_t>
std::vector<Gaussian2D<scalar_t>> stage_tile(const Inputs<scalar_t>& in, const int32_t* ids, int64_t begin,
                                             int64_t end, int b, int K) {
  std::vector<Gaussian2D<scalar_t>> staged(end - begin);
  for (int64_t j = begin; j < end; ++j) staged[j - begin] = in.gaussian(int64_t(b) * K + ids[j]);
  return staged;
}

// One tile's pixels, and the part of a Gaussian's culling box inside it. The loops below run Gaussian by
// Gaussian over only the pixels of that box (the same (pixel, Gaussian) pairs in the same per-pixel order as
// a pixel-by-pixel loop over the whole list, minus pairs the box proves are skipped anyway).
struct Tile {
  int x_begin, y_begin, w, h;  // w, h < TILE at the right and bottom borders
  Tile(const Grid& grid, int tile)
      : x_begin((tile % grid.tiles_x) * TILE), y_begin((tile / grid.tiles_x) * TILE),
        w(std::min(TILE, grid.W - x_begin)), h(std::min(TILE, grid.H - y_begin)) {}
  template <typename scalar_t>
  bool clip(const Gaussian2D<scalar_t>& g, const Grid& grid, splat::PixelRect& r) const {
    if (!splat::pixel_rect(g, grid.H, grid.W, r)) return false;
    r.x0 = std::max(r.x0, x_begin), r.x1 = std::min(r.x1, x_begin + w - 1);
    r.y0 = std::max(r.y0, y_begin), r.y1 = std::min(r.y1, y_begin + h - 1);
    return r.x0 <= r.x1 && r.y0 <= r.y1;
  }
  int local(int x, int y) const { return (y - y_begin) * TILE + (x - x_begin); }
  // The box's columns widened to whole groups of LANES pixels (still inside the tile's 16 columns), so the
  // row loops below run full SIMD vectors with no scalar remainder. The extra pixels are outside the
  // culling box, where no pair passes the alpha test (see splat_kernel.h), or outside the image, where the
  // pixel state masks them out; either way they change nothing.
  static constexpr int LANES = 8;  // one AVX2 vector of floats
  int span_begin(const splat::PixelRect& r) const { return x_begin + ((r.x0 - x_begin) & ~(LANES - 1)); }
  int span_end(const splat::PixelRect& r) const { return x_begin + ((r.x1 - x_begin) | (LANES - 1)); }
  bool inside(int p) const { return p % TILE < w && p / TILE < h; }
};

// Stage 2. Returns image [B, 3, H, W], final_T [B, H, W], n_contrib [B, H, W] (int32).
template <typename scalar_t>
std::vector<at::Tensor> rasterize_forward(const Inputs<scalar_t>& in, const at::Tensor& tile_offsets,
                                          const at::Tensor& tile_ids, int B, int K, const Grid& grid,
                                          double background, const at::TensorOptions& options) {
  const int H = grid.H, W = grid.W, n_tiles = grid.n_tiles();
  at::Tensor image = at::empty({B, 3, H, W}, options);
  at::Tensor final_T = at::empty({B, H, W}, options);
  at::Tensor n_contrib = at::empty({B, H, W}, options.dtype(at::kInt));
  scalar_t* img = image.data_ptr<scalar_t>();
  scalar_t* fT = final_T.data_ptr<scalar_t>();
  int32_t* last = n_contrib.data_ptr<int32_t>();
  const int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  const int32_t* ids = tile_ids.data_ptr<int32_t>();
  const scalar_t bg = scalar_t(background);
  const int64_t HW = int64_t(H) * W;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < int64_t(B) * n_tiles; ++job) {
    const int b = int(job / n_tiles);
    const Tile tile(grid, int(job % n_tiles));
    const auto staged = stage_tile(in, ids, offsets[job], offsets[job + 1], b, K);
    // Per-pixel state, front to back: transmittance, colour, list entries used, still compositing? Kept as
    // one array per quantity, so the loop over a row of a Gaussian's box is a SIMD loop (every pixel's state is
    // its own; evaluate and blend are branch-free).
    scalar_t T[TILE * TILE], C0[TILE * TILE], C1[TILE * TILE], C2[TILE * TILE];
    int32_t n_used[TILE * TILE], live[TILE * TILE];
    for (int p = 0; p < TILE * TILE; ++p)
      T[p] = 1, C0[p] = C1[p] = C2[p] = 0, n_used[p] = 0, live[p] = tile.inside(p);  // off-image: never live
    int n_live = tile.w * tile.h;

    for (int j = 0; j < int(staged.size()) && n_live > 0; ++j) {
      const Gaussian2D<scalar_t>& g = staged[j];
      splat::PixelRect r;
      if (!tile.clip(g, grid, r)) continue;
      for (int y = r.y0; y <= r.y1; ++y) {
        const scalar_t py = scalar_t(y) + scalar_t(0.5);
        const int row = tile.local(0, y);  // p = row + x
        int saturated = 0;
        for (int x = tile.span_begin(r); x <= tile.span_end(r); ++x) {
          const int p = row + x;
          splat::Hit<scalar_t> h;
          const bool hit = (live[p] != 0) & splat::evaluate(g, scalar_t(x) + scalar_t(0.5), py, h);
          scalar_t Tp = T[p], C[3] = {C0[p], C1[p], C2[p]};
          const bool kept = splat::blend(g, hit ? h.alpha : scalar_t(0), Tp, C);  // alpha 0: no change
          T[p] = Tp, C0[p] = C[0], C1[p] = C[1], C2[p] = C[2];
          const int took = hit & kept, stopped = hit & !kept;  // stopped: saturated, takes no more Gaussians
          n_used[p] += took * (j + 1 - n_used[p]);
          live[p] -= stopped;
          saturated += stopped;
        }
        n_live -= saturated;
      }
    }

    for (int y = tile.y_begin; y < tile.y_begin + tile.h; ++y) {
      for (int x = tile.x_begin; x < tile.x_begin + tile.w; ++x) {
        const int p = tile.local(x, y);
        const int64_t q = y * int64_t(W) + x;
        img[(int64_t(b) * 3 + 0) * HW + q] = C0[p] + T[p] * bg;
        img[(int64_t(b) * 3 + 1) * HW + q] = C1[p] + T[p] * bg;
        img[(int64_t(b) * 3 + 2) * HW + q] = C2[p] + T[p] * bg;
        fT[b * HW + q] = T[p];
        last[b * HW + q] = n_used[p];
      }
    }
  }
  return {image, final_T, n_contrib};
}

// Stage 3. grad_image [B, 3, H, W] -> dL/d(u, v, a, b, c, opacity, r, g, b) as [B, K, 9].
template <typename scalar_t>
at::Tensor rasterize_backward(const Inputs<scalar_t>& in, const at::Tensor& tile_offsets, const at::Tensor& tile_ids,
                              const at::Tensor& final_T, const at::Tensor& n_contrib, const at::Tensor& grad_image,
                              int B, int K, const Grid& grid, double background) {
  const int H = grid.H, W = grid.W, n_tiles = grid.n_tiles();
  const int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  const int32_t* ids = tile_ids.data_ptr<int32_t>();
  const scalar_t* fT = final_T.data_ptr<scalar_t>();
  const int32_t* last = n_contrib.data_ptr<int32_t>();
  const scalar_t* dimg = grad_image.data_ptr<scalar_t>();
  const scalar_t bg = scalar_t(background);
  const int64_t HW = int64_t(H) * W;

  static_assert(sizeof(Gaussian2D<scalar_t>) == splat::GRAD_DIM * sizeof(scalar_t), "Gaussian2D must be 9 scalars");
  at::Tensor entry_grads = at::zeros({tile_ids.numel(), splat::GRAD_DIM}, final_T.options());
  auto* partial = reinterpret_cast<Gaussian2D<scalar_t>*>(entry_grads.data_ptr<scalar_t>());

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < int64_t(B) * n_tiles; ++job) {
    const int b = int(job / n_tiles);
    const Tile tile(grid, int(job % n_tiles));
    const auto staged = stage_tile(in, ids, offsets[job], offsets[job + 1], b, K);
    // Per-pixel state, back to front: T_{i+1}, S_i (splat_kernel.h), dL/dC, and where the walk starts; one
    // array per quantity, so the loop over a row of a Gaussian's box is a SIMD loop, as in the forward.
    scalar_t T[TILE * TILE], S0[TILE * TILE], S1[TILE * TILE], S2[TILE * TILE];
    scalar_t dC0[TILE * TILE], dC1[TILE * TILE], dC2[TILE * TILE];
    int32_t n_used[TILE * TILE];
    for (int p = 0; p < TILE * TILE; ++p)  // off-image pixels: no contributor, zero state
      T[p] = S0[p] = S1[p] = S2[p] = dC0[p] = dC1[p] = dC2[p] = 0, n_used[p] = 0;
    int start = 0;
    for (int y = tile.y_begin; y < tile.y_begin + tile.h; ++y) {
      for (int x = tile.x_begin; x < tile.x_begin + tile.w; ++x) {
        const int p = tile.local(x, y);
        const int64_t q = y * int64_t(W) + x;
        T[p] = fT[b * HW + q];
        S0[p] = S1[p] = S2[p] = T[p] * bg;  // behind the last contributor there is only the background
        dC0[p] = dimg[(int64_t(b) * 3 + 0) * HW + q];
        dC1[p] = dimg[(int64_t(b) * 3 + 1) * HW + q];
        dC2[p] = dimg[(int64_t(b) * 3 + 2) * HW + q];
        n_used[p] = last[b * HW + q];
        start = std::max(start, int(n_used[p]));
      }
    }

    for (int j = start - 1; j >= 0; --j) {
      const Gaussian2D<scalar_t>& g = staged[j];
      splat::PixelRect r;
      if (!tile.clip(g, grid, r)) continue;
      // Per column of the tile, this Gaussian's gradient summed over the box's rows; the columns are added
      // in a fixed order at the end (no reduction across SIMD lanes, so no reassociation).
      scalar_t acc[splat::GRAD_DIM][TILE] = {};
      for (int y = r.y0; y <= r.y1; ++y) {
        const scalar_t py = scalar_t(y) + scalar_t(0.5);
        const int row = tile.local(0, y);  // p = row + x
        for (int x = tile.span_begin(r); x <= tile.span_end(r); ++x) {
          const int p = row + x, col = x - tile.x_begin;
          splat::Hit<scalar_t> h;
          // Behind this pixel's last contributor, or skipped in forward too: no step (hit false).
          const bool hit = (j < n_used[p]) & splat::evaluate(g, scalar_t(x) + scalar_t(0.5), py, h);
          scalar_t Tp = T[p], S[3] = {S0[p], S1[p], S2[p]};
          const scalar_t dL_dC[3] = {dC0[p], dC1[p], dC2[p]};
          const Gaussian2D<scalar_t> d = splat::blend_backward(g, h, hit, dL_dC, Tp, S);
          T[p] = Tp, S0[p] = S[0], S1[p] = S[1], S2[p] = S[2];
          acc[0][col] += d.u, acc[1][col] += d.v, acc[2][col] += d.a, acc[3][col] += d.b, acc[4][col] += d.c;
          acc[5][col] += d.opacity, acc[6][col] += d.rgb[0], acc[7][col] += d.rgb[1], acc[8][col] += d.rgb[2];
        }
      }
      scalar_t* grad = reinterpret_cast<scalar_t*>(&partial[offsets[job] + j]);  // this task's own row
      for (int k = 0; k < splat::GRAD_DIM; ++k) {
        grad[k] = 0;
        for (int col = 0; col < TILE; ++col) grad[k] += acc[k][col];
      }
    }
  }

  // Add each list entry's gradient to its Gaussian. An image's entries only touch that image's Gaussians,
  // so images run in parallel without sharing a row.
  at::Tensor grads = at::zeros({B, K, splat::GRAD_DIM}, final_T.options());
  auto* out = reinterpret_cast<Gaussian2D<scalar_t>*>(grads.data_ptr<scalar_t>());
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b)
    for (int64_t e = offsets[int64_t(b) * n_tiles]; e < offsets[int64_t(b + 1) * n_tiles]; ++e)
      splat::accumulate(out[int64_t(b) * K + ids[e]], partial[e]);
  return grads;
}

// Python entry points. order [B, K] (int64) is the stable depth argsort computed in splat.py.
// Returns image, final_T, n_contrib, tile_offsets, tile_ids (everything backward needs besides the inputs).
std::vector<at::Tensor> forward(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                                const at::Tensor& opacity, const at::Tensor& order, int64_t H, int64_t W,
                                double background) {
  splat::check_inputs(means2d, conic, rgb, opacity, at::kCPU, "cpu");
  splat::check_order(order, means2d, opacity);
  TORCH_CHECK(H > 0 && W > 0, "image size must be positive, got ", H, " x ", W);
  const int B = int(means2d.size(0)), K = int(means2d.size(1));
  const Grid grid = splat::make_grid(int(H), int(W));
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "splat_cpu_forward", [&] {
    const auto in = inputs<scalar_t>(means2d, conic, rgb, opacity);
    const auto lists = bin_gaussians(in, order.data_ptr<int64_t>(), B, K, grid);
    out = rasterize_forward(in, lists[0], lists[1], B, K, grid, background, means2d.options());
    out.insert(out.end(), lists.begin(), lists.end());
  });
  return out;
}

at::Tensor backward(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                    const at::Tensor& opacity, const at::Tensor& final_T, const at::Tensor& n_contrib,
                    const at::Tensor& tile_offsets, const at::Tensor& tile_ids, const at::Tensor& grad_image,
                    double background) {
  splat::check_inputs(means2d, conic, rgb, opacity, at::kCPU, "cpu");
  splat::check_saved(means2d, final_T, n_contrib, tile_offsets, tile_ids, grad_image);
  // The lists' ends agree with tile_ids (on the CPU reading them is free; the cuda backend skips this).
  const int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[tile_offsets.size(0) - 1] == tile_ids.numel(),
              "splat backward: tile_offsets must run from 0 to tile_ids.numel() = ", tile_ids.numel(), ", got ",
              offsets[0], " to ", offsets[tile_offsets.size(0) - 1]);
  const int B = int(means2d.size(0)), K = int(means2d.size(1));
  const Grid grid = splat::make_grid(int(final_T.size(1)), int(final_T.size(2)));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "splat_cpu_backward", [&] {
    out = rasterize_backward(inputs<scalar_t>(means2d, conic, rgb, opacity), tile_offsets, tile_ids, final_T,
                             n_contrib, grad_image, B, K, grid, background);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tile-based Gaussian rasterizer, CPU (see splat_cpu.cpp)";
  m.def("forward", &forward, "means2d, conic, rgb, opacity, order, H, W, background -> "
                             "image, final_T, n_contrib, tile_offsets, tile_ids");
  m.def("backward", &backward, "inputs, saved tensors, grad_image, background -> grads [B, K, 9]");
}
