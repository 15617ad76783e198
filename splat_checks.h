/*
 * splat_checks.h -- the argument checks of the rasterizer's Python entry points, written once for the CPU
 * (splat_cpu.cpp) and the GPU (splat_cuda.cu) kernels. Host-only ATen code; the per-pixel math is in
 * splat_kernel.h.
 *
 * The kernels index every tensor by raw pointer with B, K, H, W and the tile count read from the tensors, so a
 * wrong size, dtype, device or layout would read out of bounds instead of failing: each is checked here and
 * fails with a RuntimeError that names the tensor, what it must be and what it was. Only values are trusted.
 * Each check takes the device type its kernel needs (at::kCPU, at::kCUDA) and the backend's name ("cpu",
 * "cuda") for its messages.
 *
 * Shapes: means2d [B, K, 2], conic [B, K, 3], rgb [B, K, 3], opacity [B, K], order [B, K] (int64);
 * saved by forward: final_T [B, H, W], n_contrib [B, H, W] (int32), tile_offsets [B * n_tiles + 1] (int64),
 * tile_ids [n_entries] (int32); grad_image [B, 3, H, W].
 */
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <utility>

#include "splat_kernel.h"

namespace splat {

// The kernels' view of the Gaussians' tensors (splat_kernel.h's Inputs), after check_inputs.
template <typename scalar_t>
Inputs<scalar_t> inputs(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                        const at::Tensor& opacity) {
  return {means2d.data_ptr<scalar_t>(), conic.data_ptr<scalar_t>(), rgb.data_ptr<scalar_t>(),
          opacity.data_ptr<scalar_t>()};
}

// The Gaussians: one dtype, one device of the backend's type, contiguous, [B, K, .] with K < 2^31.
inline void check_inputs(const at::Tensor& means2d, const at::Tensor& conic, const at::Tensor& rgb,
                         const at::Tensor& opacity, c10::DeviceType device_type, const char* backend) {
  TORCH_CHECK(means2d.device().type() == device_type, "splat ", backend, " backend needs ",
              c10::DeviceTypeName(device_type), " tensors, got ", means2d.device());
  TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [B, K, 2], got ", means2d.sizes());
  const int64_t B = means2d.size(0), K = means2d.size(1);
  TORCH_CHECK(conic.sizes() == at::IntArrayRef({B, K, 3}), "conic must be [B, K, 3], got ", conic.sizes());
  TORCH_CHECK(rgb.sizes() == at::IntArrayRef({B, K, 3}), "rgb must be [B, K, 3], got ", rgb.sizes());
  TORCH_CHECK(opacity.sizes() == at::IntArrayRef({B, K}), "opacity must be [B, K], got ", opacity.sizes());
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&means2d, "means2d"}, {&conic, "conic"}, {&rgb, "rgb"}, {&opacity, "opacity"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->scalar_type() == means2d.scalar_type(), "all inputs must share one dtype: ", name, " is ",
                t->scalar_type(), ", means2d ", means2d.scalar_type());
    TORCH_CHECK(t->device() == means2d.device(), "splat ", backend, " backend: inputs must be on one ",
                c10::DeviceTypeName(device_type), " device: ", name, " is on ", t->device(), ", means2d on ",
                means2d.device());
    TORCH_CHECK(t->is_contiguous(), "splat ", backend, " backend: inputs must be contiguous, ", name, " is not");
  }
  TORCH_CHECK(K < (int64_t(1) << 31), "at most 2^31 - 1 Gaussians per image, got ", K);
}

// The depth order splat.py computed (a stable argsort), on the inputs' device.
inline void check_order(const at::Tensor& order, const at::Tensor& means2d, const at::Tensor& opacity) {
  TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous() && order.sizes() == opacity.sizes() &&
                  order.device() == means2d.device(),
              "order must be a contiguous int64 [B, K] tensor on the inputs' device ", means2d.device(), ", got ",
              order.scalar_type(), " ", order.sizes(), " on ", order.device());
}

// The tensors forward saved and the incoming gradient, checked like the inputs (check_inputs first).
inline void check_saved(const at::Tensor& means2d, const at::Tensor& final_T, const at::Tensor& n_contrib,
                        const at::Tensor& tile_offsets, const at::Tensor& tile_ids, const at::Tensor& grad_image) {
  const std::pair<const at::Tensor*, const char*> named[] = {{&final_T, "final_T"}, {&n_contrib, "n_contrib"},
                                                             {&tile_offsets, "tile_offsets"}, {&tile_ids, "tile_ids"},
                                                             {&grad_image, "grad_image"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->device() == means2d.device(), "splat backward: ", name, " must be on ", means2d.device(),
                " like the inputs, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "splat backward: ", name, " must be contiguous");
  }
  const int64_t B = means2d.size(0);
  TORCH_CHECK(final_T.dim() == 3 && final_T.size(0) == B, "splat backward: final_T must be [B, H, W] with B = ", B,
              ", got ", final_T.sizes());
  const int64_t H = final_T.size(1), W = final_T.size(2);
  TORCH_CHECK(H > 0 && W > 0, "splat backward: image size must be positive, got ", H, " x ", W);
  TORCH_CHECK(final_T.scalar_type() == means2d.scalar_type(), "splat backward: final_T must be ",
              means2d.scalar_type(), " like the inputs, got ", final_T.scalar_type());
  TORCH_CHECK(n_contrib.scalar_type() == at::kInt && n_contrib.sizes() == final_T.sizes(),
              "splat backward: n_contrib must be int32 ", final_T.sizes(), ", got ", n_contrib.scalar_type(), " ",
              n_contrib.sizes());
  const int64_t n_tiles = ((H + TILE - 1) / TILE) * ((W + TILE - 1) / TILE);
  TORCH_CHECK(tile_offsets.scalar_type() == at::kLong && tile_offsets.dim() == 1 &&
                  tile_offsets.size(0) == B * n_tiles + 1,
              "splat backward: tile_offsets must be int64 [B * n_tiles + 1] = [", B * n_tiles + 1, "], got ",
              tile_offsets.scalar_type(), " ", tile_offsets.sizes());
  TORCH_CHECK(tile_ids.scalar_type() == at::kInt && tile_ids.dim() == 1,
              "splat backward: tile_ids must be int32 [n_entries], got ", tile_ids.scalar_type(), " ",
              tile_ids.sizes());
  TORCH_CHECK(grad_image.scalar_type() == means2d.scalar_type() && grad_image.sizes() == at::IntArrayRef({B, 3, H, W}),
              "splat backward: grad_image must be ", means2d.scalar_type(), " [", B, ", 3, ", H, ", ", W, "], got ",
              grad_image.scalar_type(), " ", grad_image.sizes());
}

}  // namespace splat
