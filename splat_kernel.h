/*
 * splat_kernel.h -- the per-pixel math of Gaussian splatting, written once for the CPU (splat_cpu.cpp) and
 * the GPU (splat_cuda.cu) rasterizers, so the CPU build tests the very lines the GPU runs.
 *
 * Each pixel composites the Gaussians of its tile front to back by the rules of docs/design.md 3 (stated in
 * full there and in splat.py, whose `rasterize_torch` is the spec): power, alpha, T and C below are theirs.
 *
 * Backward (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 6; gsplat): the forward pass keeps only the
 * final T and the number of tile-list entries up to the last contributor, per pixel. Writing
 *     C = sum_i T_i alpha_i c_i + T_N bg,    T_i = prod_{j<i} (1 - alpha_j),
 *     S_i = sum_{j>i} T_j alpha_j c_j + T_N bg          (the colour behind Gaussian i)
 * a walk from the last contributor to the first recovers T_i = T_{i+1} / (1 - alpha_i) and S_i, and
 *     dC/dc_i     = T_i alpha_i
 *     dC/dalpha_i = T_i c_i - S_i / (1 - alpha_i)      (every T_j behind i carries a factor (1 - alpha_i))
 * Unless alpha was clamped (no gradient through the clamp, as in gsplat):
 *     dalpha/dopacity = exp(power),  dalpha/dpower = alpha,
 *     dpower/du = a dx + b dy,  dpower/dv = b dx + c dy,          (d = p - mean, so d(dx)/du = -1)
 *     dpower/da = -dx^2 / 2,  dpower/db = -dx dy,  dpower/dc = -dy^2 / 2.
 * The formulas are derived here from the compositing equation; no rasterizer code was copied.
 *
 * Culling: alpha >= 1/255 needs power >= -ln 255, i.e. Mahalanobis distance <= sqrt(2 ln 255) = 3.329, so
 * the box |dx| <= 3.33 sqrt(Sigma2_xx), |dy| <= 3.33 sqrt(Sigma2_yy) around the mean drops nothing
 * (Sigma2 = conic^-1). Tiles are 16 x 16 pixels; a Gaussian goes into the list of every tile its box meets.
 * This shortcut changes no result for opacity in [0, 1], which splat.rasterize enforces (check_opacity):
 * for opacity > 1 the box would cut pairs the reference keeps.
 *
 * The camera lives in splat.project (torch): it gives means, conics and the depth order. Depth reaches the
 * image only through those (a nearer Gaussian has a larger footprint), so the kernels need no camera code
 * and z gets its gradient from the conic's.
 *
 * Shapes (row-major, contiguous): means2d [B, K, 2], conic [B, K, 3], rgb [B, K, 3], opacity [B, K].
 */
#pragma once

#include <math.h>
#include <string.h>

#ifdef __CUDACC__
#define SPLAT_HD __host__ __device__ __forceinline__
#else
#define SPLAT_HD inline
#endif

namespace splat {

// The constants of splat.py / docs/design.md 3.
constexpr int TILE = 16;  // tile side in pixels; a CUDA block is one tile, one thread per pixel
constexpr double ALPHA_MAX = 0.999;
constexpr double ALPHA_MIN = 1.0 / 255.0;
constexpr double T_MIN = 1e-4;
constexpr double CULL_SIGMA = 3.33;

// One projected Gaussian: all a pixel needs. The gradient of the loss w.r.t. these 9 numbers has the
// same layout, so a gradient is a Gaussian2D too (and a row of 9 scalars in the gradient buffers).
template <typename scalar_t>
struct Gaussian2D {
  scalar_t u, v;     // mean in pixels
  scalar_t a, b, c;  // conic: the inverse 2-D covariance [[a, b], [b, c]]
  scalar_t opacity;
  scalar_t rgb[3];
};
constexpr int GRAD_DIM = 9;  // [du, dv, da, db, dc, dopacity, dr, dg, db]

template <typename scalar_t>
SPLAT_HD Gaussian2D<scalar_t> load_gaussian(const scalar_t* means2d, const scalar_t* conic, const scalar_t* rgb,
                                            const scalar_t* opacity, long long i) {
  Gaussian2D<scalar_t> g;
  g.u = means2d[2 * i], g.v = means2d[2 * i + 1];
  g.a = conic[3 * i], g.b = conic[3 * i + 1], g.c = conic[3 * i + 2];
  g.opacity = opacity[i];
  g.rgb[0] = rgb[3 * i], g.rgb[1] = rgb[3 * i + 1], g.rgb[2] = rgb[3 * i + 2];
  return g;
}

// The Gaussians as both kernels read them: raw pointers into the contiguous [B, K, .] tensors (host memory for
// the cpu kernel, device memory for the cuda one; splat_checks.h's inputs() fills them from the tensors).
template <typename scalar_t>
struct Inputs {
  const scalar_t *means2d, *conic, *rgb, *opacity;
  SPLAT_HD Gaussian2D<scalar_t> gaussian(long long i) const {
    return load_gaussian(means2d, conic, rgb, opacity, i);
  }
};

// The tiling of one H x W image into TILE x TILE tiles, the last row and column possibly partial.
struct Grid {
  int H, W, tiles_x, tiles_y;
  SPLAT_HD int n_tiles() const { return tiles_x * tiles_y; }
};

inline Grid make_grid(int H, int W) { return {H, W, (W + TILE - 1) / TILE, (H + TILE - 1) / TILE}; }

template <typename scalar_t>
SPLAT_HD Gaussian2D<scalar_t> zero_gaussian() {
  Gaussian2D<scalar_t> g;
  g.u = g.v = g.a = g.b = g.c = g.opacity = g.rgb[0] = g.rgb[1] = g.rgb[2] = scalar_t(0);
  return g;
}

template <typename scalar_t>
SPLAT_HD void accumulate(Gaussian2D<scalar_t>& acc, const Gaussian2D<scalar_t>& g) {
  acc.u += g.u, acc.v += g.v, acc.a += g.a, acc.b += g.b, acc.c += g.c, acc.opacity += g.opacity;
  acc.rgb[0] += g.rgb[0], acc.rgb[1] += g.rgb[1], acc.rgb[2] += g.rgb[2];
}

// exp in float, written out so a compiler can vectorize it (a libm call stops the CPU kernel's SIMD loops):
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 with ln 2 split in two (Cody and Waite 1980), and
// exp(r) on |r| <= ln(2) / 2 by the polynomial of Cephes' expf (S. Moshier). Error < 1 ulp of the exact exp
// on [-87.3, 0] (max 0.99, mean 0.27, measured on 3M points in a float32 emulation without FMA).
// x is clamped to [-87.3, 88.3], where 2^n stays a normal float: the callers only need x <= 0, and below
// -87.3 exp is < 1.2e-38, far under any threshold here. Adding and subtracting 1.5 * 2^23 rounds to nearest.
SPLAT_HD float splat_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = (int(n) + 127) * (1 << 23);  // 2^n as a float's bit pattern
#ifdef __CUDA_ARCH__
  return p * __int_as_float(bits);
#else
  float two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
#endif
}
SPLAT_HD double splat_exp(double x) { return exp(x); }

// One (pixel, Gaussian) pair, kept for the backward step.
template <typename scalar_t>
struct Hit {
  scalar_t dx, dy;  // pixel centre minus mean
  scalar_t gauss;   // exp(power)
  scalar_t alpha;   // after the clamp
  bool clamped;     // alpha was cut to 0.999: no gradient reaches opacity, mean or conic
};

// power and alpha of Gaussian g at pixel centre (px, py). Returns false when the pair is skipped
// (power > 0 or alpha < 1/255); the strict / non-strict comparisons are those of rasterize_torch.
// Branch-free (the exp is taken for every pair, and h is always filled), so the CPU kernel's loops over a row
// of pixels vectorize; a skipped pair's h is never used.
template <typename scalar_t>
SPLAT_HD bool evaluate(const Gaussian2D<scalar_t>& g, scalar_t px, scalar_t py, Hit<scalar_t>& h) {
  h.dx = px - g.u;
  h.dy = py - g.v;
  const scalar_t power = scalar_t(-0.5) * (g.a * h.dx * h.dx + scalar_t(2) * g.b * h.dx * h.dy + g.c * h.dy * h.dy);
  h.gauss = splat_exp(power);
  const scalar_t alpha = g.opacity * h.gauss;
  h.clamped = alpha > scalar_t(ALPHA_MAX);
  h.alpha = h.clamped ? scalar_t(ALPHA_MAX) : alpha;
  // alpha >= 1/255 before the clamp is the same test as after it (the clamp only lowers alpha > 0.999).
  return (power <= scalar_t(0)) & (alpha >= scalar_t(ALPHA_MIN));
}

// Front-to-back compositing of one Gaussian into a pixel's (T, C). Returns false when the pixel is
// saturated: T would fall to <= 1e-4, so this Gaussian and every one behind it are left out (T and C are
// then unchanged). Branch-free: alpha = 0 (a skipped pair) changes nothing and returns true, since a pixel
// still compositing has T > 1e-4.
template <typename scalar_t>
SPLAT_HD bool blend(const Gaussian2D<scalar_t>& g, scalar_t alpha, scalar_t& T, scalar_t C[3]) {
  const scalar_t T_next = T * (scalar_t(1) - alpha);
  const bool kept = T_next > scalar_t(T_MIN);
  const scalar_t w = kept ? T * alpha : scalar_t(0);
  C[0] += w * g.rgb[0];
  C[1] += w * g.rgb[1];
  C[2] += w * g.rgb[2];
  T = kept ? T_next : T;
  return kept;
}

// One back-to-front step for a pair (see the top of the file). On entry T = T_{i+1} and S = S_i; on exit
// T = T_i and S = S_{i-1}. Returns this pixel's share of dL/d(Gaussian i). A pair that did not contribute
// (hit false: skipped, or behind the pixel's last contributor) leaves T and S as they are and returns zeros;
// written without branches (alpha = 0 makes every step an identity) so the CPU kernel's row loops vectorize.
template <typename scalar_t>
SPLAT_HD Gaussian2D<scalar_t> blend_backward(const Gaussian2D<scalar_t>& g, const Hit<scalar_t>& h, bool hit,
                                             const scalar_t dL_dC[3], scalar_t& T, scalar_t S[3]) {
  Gaussian2D<scalar_t> grad;
  const scalar_t alpha = hit ? h.alpha : scalar_t(0);
  const scalar_t inv_one_minus = scalar_t(1) / (scalar_t(1) - alpha);  // 1 - alpha >= 0.001 thanks to the clamp
  T = T * inv_one_minus;
  const scalar_t w = T * alpha;
  scalar_t dL_dalpha = scalar_t(0);
  for (int ch = 0; ch < 3; ++ch) {
    grad.rgb[ch] = w * dL_dC[ch];
    dL_dalpha += dL_dC[ch] * (T * g.rgb[ch] - S[ch] * inv_one_minus);
    S[ch] += w * g.rgb[ch];
  }
  const bool flows = hit & !h.clamped;  // no gradient through the clamp
  grad.opacity = flows ? dL_dalpha * h.gauss : scalar_t(0);
  const scalar_t dL_dpower = flows ? dL_dalpha * h.alpha : scalar_t(0);
  grad.u = dL_dpower * (g.a * h.dx + g.b * h.dy);
  grad.v = dL_dpower * (g.b * h.dx + g.c * h.dy);
  grad.a = scalar_t(-0.5) * dL_dpower * h.dx * h.dx;
  grad.b = -dL_dpower * h.dx * h.dy;
  grad.c = scalar_t(-0.5) * dL_dpower * h.dy * h.dy;
  return grad;
}

// Pixels (inclusive ranges; pixel x has its centre at x + 0.5) inside the culling box of g, clipped to
// the image. Returns false when the box misses the image, or when opacity < 1/255: alpha <= opacity can
// then never pass the alpha test (the comparison also drops NaN parameters). Worked in double: it runs
// once per Gaussian, and the 3.33 vs 3.329 margin only has to beat rounding.
struct PixelRect {
  int x0, x1, y0, y1;
};

template <typename scalar_t>
SPLAT_HD bool pixel_rect(const Gaussian2D<scalar_t>& g, int H, int W, PixelRect& r) {
  if (!(double(g.opacity) >= ALPHA_MIN)) return false;
  const double det = double(g.a) * double(g.c) - double(g.b) * double(g.b);  // det(conic) = 1 / det(Sigma2)
  const double ex = CULL_SIGMA * sqrt(double(g.c) / det);                  // Sigma2_xx = c / det
  const double ey = CULL_SIGMA * sqrt(double(g.a) / det);                  // Sigma2_yy = a / det
  const double x0 = ceil(double(g.u) - ex - 0.5), x1 = floor(double(g.u) + ex - 0.5);
  const double y0 = ceil(double(g.v) - ey - 0.5), y1 = floor(double(g.v) + ey - 0.5);
  if (!(x0 <= x1 && y0 <= y1 && x0 <= W - 1 && x1 >= 0 && y0 <= H - 1 && y1 >= 0)) return false;
  r.x0 = x0 > 0 ? int(x0) : 0;
  r.x1 = x1 < W - 1 ? int(x1) : W - 1;
  r.y0 = y0 > 0 ? int(y0) : 0;
  r.y1 = y1 < H - 1 ? int(y1) : H - 1;
  return true;
}

}  // namespace splat
