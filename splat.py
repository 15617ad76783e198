"""
Differentiable Gaussian splatting for GMAE: camera, covariance, projection, and the reference rasterizer.

A GMAE decoder predicts K Gaussians per image, each a 14-vector of *valid* parameters
(model.gaussian_activation turns raw decoder outputs into these):

    g = [x, y, z,  sx, sy, sz,  qw, qx, qy, qz,  r, g, b,  opacity]
         centre    scale        unit quaternion  colour    in [0, 1]
         in [-1,1]^3

The image is made in two steps (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4-6; docs/design.md 2-3):

1. project (pure torch, one place knows the camera). The authors' gsplat setup: the scene sits 8 units in
   front of a 90-degree pinhole (focal fx = W/2, fy = H/2); centres land orthographically, footprints are the
   perspective EWA projection at camera depth zc = z + 8 (a nearer Gaussian draws larger, by 8 / zc):
       u = (x + 1) W / 2,  v = (y + 1) H / 2                 pixel i has its centre at i + 0.5
       Sigma3 = R S S^T R^T                                 R from the quaternion, S = diag(scale)
       J = [[fx/zc, 0, -fx x/zc^2], [0, fy/zc, -fy y/zc^2]]  (EWA Jacobian, Zwicker et al. 2002)
       Sigma2 = J Sigma3 J^T + 0.3 I,  conic = Sigma2^-1 = [[a, b], [b, c]],  depth = zc
   With scale c sigmoid(.) (model.gaussian_activation), the largest std is c W/16 px at z = 0.
2. rasterize: front to back over Gaussians sorted by depth (ties by index), per pixel p:
       power = -0.5 (a dx^2 + 2 b dx dy + c dy^2),  d = p - (u, v);  skip if power > 0
       alpha = min(0.999, opacity exp(power));  skip if alpha < 1/255
       T_next = T (1 - alpha);  stop (this Gaussian excluded) if T_next <= 1e-4
       C += T alpha rgb;  T = T_next
       image = C + T background          (background 1 = white)

Depth both orders the Gaussians (no gradient: the order is piecewise constant) and sizes their footprint
(through J: a smooth gradient). So z is learned, and a decoder can move a Gaussian in front of another.

`rasterize_torch` below is the spec: dense [B, HW, K] tensors, exact rules, float32 or float64, autograd.
The fast kernels (splat_cpu.cpp, splat_cuda.cu; per-pixel math shared in splat_kernel.h) are tile-based,
cost pixels x Gaussians-per-pixel instead of pixels x K, and are checked against it in value and gradient
(tests/test_splat_backends.py). render(..., backend="auto" | "torch" | "cpu" | "cuda" | "cuda-sim"); the
kernels compile on first use (about 20 s, then cached on disk), and available_backends() lists those that work
here. "cuda-sim" runs splat_cuda.cu itself on the CPU, one GPU thread at a time (cuda_sim.h): slow, for tests and
for reading; "auto" never picks it.

Shapes: B images, K Gaussians, H x W pixels.
    gaussians [B, K, 14] -> render -> image [B, 3, H, W]

Try it:  python -c "import splat, torch; print(splat.render(torch.rand(1, 8, 14), 16, 16).shape)"
"""
import functools
import hashlib
import os
import platform
import re
import warnings

import torch
from torch.autograd.function import once_differentiable

# Compositing constants of docs/design.md 3 (the values of the 3DGS / gsplat reference rasterizers).
ALPHA_MAX = 0.999  # alpha clamp of gsplat (the authors' rasterizer; 3DGS uses 0.99); no gradient through it
ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped
T_MIN = 1e-4  # stop when transmittance would fall to or below this
EPS2D = 0.3  # px^2 added to the 2-D covariance (anti-aliasing low-pass of 3DGS)
# alpha >= 1/255 needs Mahalanobis distance <= sqrt(2 ln 255) = 3.329, so this per-axis box drops nothing.
CULL_SIGMA = 3.33
CAMERA_DISTANCE = 8.0  # the scene sits this far in front of the pinhole: camera depth zc = z + 8

PARAM_DIM = 14


def split_gaussians(g):
    """[..., 14] -> xyz [..., 3], scale [..., 3], quat [..., 4], rgb [..., 3], opacity [...]."""
    if g.shape[-1] != PARAM_DIM:
        raise ValueError(f"Gaussians must have {PARAM_DIM} parameters in the last dim, got shape {tuple(g.shape)}")
    return g[..., 0:3], g[..., 3:6], g[..., 6:10], g[..., 10:13], g[..., 13]


def quat_to_rotmat(q):
    """Unit quaternion (w, x, y, z) [..., 4] -> rotation matrix [..., 3, 3]."""
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(*q.shape[:-1], 3, 3)


def covariance3d(scale, quat):
    """Sigma3 = R S S^T R^T, [..., 3, 3]; symmetric positive semi-definite for any unit quaternion."""
    M = quat_to_rotmat(quat) * scale.unsqueeze(-2)  # R @ diag(s): scale column j by s_j
    return M @ M.transpose(-1, -2)


def project(gaussians, H, W):
    """The fixed camera of docs/design.md 2 (the GMAE authors' gsplat setup).

    The scene sits CAMERA_DISTANCE = 8 units in front of a 90-degree pinhole (focal W/2, H/2). Centres land
    orthographically (world x, y in [-1, 1] span the image), but each footprint is the perspective EWA
    projection at camera depth zc = z + 8 (Zwicker et al. 2002), so a nearer Gaussian draws larger by
    8 / zc and z gets a gradient through the footprint:
        J = [[fx / zc, 0, -fx x / zc^2], [0, fy / zc, -fy y / zc^2]],  Sigma2 = J R S S^T R^T J^T + 0.3 I

    gaussians [B, K, 14] (valid parameters) ->
        means2d [B, K, 2] (u, v in pixels), conic [B, K, 3] (a, b, c), depth [B, K] (zc, the sort key),
        rgb [B, K, 3], opacity [B, K], extent [B, K, 2] (half-size in px of the lossless culling box).
    """
    xyz, scale, quat, rgb, opacity = split_gaussians(gaussians)
    x, y, z = xyz.unbind(-1)
    fx, fy = W / 2, H / 2
    means2d = torch.stack([(x + 1) * fx, (y + 1) * fy], dim=-1)  # [B, K, 2]
    zc = z + CAMERA_DISTANCE  # [B, K], in [7, 9] for z in [-1, 1]
    zero = torch.zeros_like(zc)
    J = torch.stack([fx / zc, zero, -fx * x / zc**2, zero, fy / zc, -fy * y / zc**2], -1)
    J = J.reshape(*zc.shape, 2, 3)  # [B, K, 2, 3]
    # Sigma2 = (J R S)(J R S)^T: form the 2 x 3 factor M = J R S, never the 3 x 3 Sigma3.
    M = J @ (quat_to_rotmat(quat) * scale.unsqueeze(-2))  # [B, K, 2, 3]
    m0, m1 = M.unbind(-2)
    sxx = (m0 * m0).sum(-1) + EPS2D
    sxy = (m0 * m1).sum(-1)
    syy = (m1 * m1).sum(-1) + EPS2D
    det = sxx * syy - sxy * sxy  # > 0: the +0.3 I makes Sigma2 positive definite
    conic = torch.stack([syy, -sxy, sxx], dim=-1) / det.unsqueeze(-1)  # [B, K, 3]
    extent = CULL_SIGMA * torch.stack([sxx, syy], dim=-1).sqrt()
    return means2d, conic, zc, rgb, opacity, extent


def rotmat_to_quat(R):
    """Rotation matrix [..., 3, 3] (det +1) -> unit quaternion (w, x, y, z) [..., 4] with w >= 0, the inverse of
    quat_to_rotmat. Each quaternion is read off the largest of 1 + trace, 1 + 2 R_xx - trace, ... so that no
    division is by a number near 0 (Shepperd 1978)."""
    r = R.reshape(-1, 3, 3)
    t = r.diagonal(dim1=-2, dim2=-1)  # [N, 3]
    cands = torch.stack([1 + t.sum(-1), 1 + 2 * t[:, 0] - t.sum(-1), 1 + 2 * t[:, 1] - t.sum(-1),
                         1 + 2 * t[:, 2] - t.sum(-1)], -1)  # 4 w^2, 4 x^2, 4 y^2, 4 z^2
    best = cands.argmax(-1)
    s = cands.gather(-1, best[:, None]).clamp_min(1e-30).sqrt()[:, 0]  # 2 |q_best|
    a, b, c = r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]  # 4 w x, 4 w y, 4 w z
    d, e, f = r[:, 0, 1] + r[:, 1, 0], r[:, 0, 2] + r[:, 2, 0], r[:, 1, 2] + r[:, 2, 1]  # 4 x y, 4 x z, 4 y z
    q = torch.stack([torch.stack([s * s, a, b, c], -1), torch.stack([a, s * s, d, e], -1),
                     torch.stack([b, d, s * s, f], -1), torch.stack([c, e, f, s * s], -1)], 1)  # [N, 4 cases, 4]
    q = q[torch.arange(len(r)), best] / (2 * s[:, None])
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0).to(q)  # q and -q are one rotation: keep w >= 0
    return (q / q.norm(dim=-1, keepdim=True)).reshape(*R.shape[:-2], 4)


def to_pinhole(gaussians, H, W, min_scale=1e-6):
    """The Gaussians [K, 14] as a 3-D scene that a standard pinhole camera draws as `project` does at H x W
    (docs/design.md 2): the camera at the origin looking along +z, x right, y down (the 3DGS / COLMAP frame),
    focal f = W / 2 on both axes (square pixels: the scene keeps the picture's aspect), principal point
    (W / 2, H / 2), pixel centres at i + 0.5.

    Centres are unprojected along the pixel ray `project` gives them, at the depth its footprint uses:
        Z = z + 8,  X = x Z,  Y = y Z r  with r = H / W,  so f X / Z + W / 2 = (x + 1) W / 2, and likewise v.
    Footprints: at (X, Y, Z) a pinhole's EWA Jacobian is J_p = [[f/Z, 0, -f X/Z^2], [0, f/Z, -f Y/Z^2]], while
    `project`'s J has H/2 on its second row and off-axis terms 1/Z of a pinhole's (it uses the world x where a
    pinhole has X = x Z). J_p A = J for A = [[1, 0, x (1 - 1/Z)], [0, r, r y (1 - 1/Z)], [0, 0, 1]], so the pinhole
    draws A Sigma3 A^T exactly as `project` draws Sigma3; its eigenvectors and the roots of its eigenvalues are the
    scene's rotation and scales (at least min_scale, so a viewer's log never meets 0).
    Returns Gaussians [K, 14] in the camera's frame (float64) and the camera as a dict (fx, fy, cx, cy, W, H)."""
    g = gaussians.detach().double()
    if g.dim() != 2 or not torch.isfinite(g).all():
        raise ValueError(f"to_pinhole takes finite Gaussians [K, 14], got shape {tuple(g.shape)}"
                         + ("" if g.dim() != 2 else " with NaN or inf"))
    xyz, scale, quat, rgb, opacity = split_gaussians(g)
    x, y, z = xyz.unbind(-1)
    Z, r = z + CAMERA_DISTANCE, H / W
    centres = torch.stack([x * Z, y * Z * r, Z], -1)
    A = torch.zeros(len(g), 3, 3, dtype=g.dtype)
    A[:, 0, 0], A[:, 1, 1], A[:, 2, 2] = 1, r, 1
    A[:, 0, 2], A[:, 1, 2] = x * (1 - 1 / Z), r * y * (1 - 1 / Z)
    sigma = A @ covariance3d(scale, quat) @ A.transpose(-1, -2)
    eigenvalues, R = torch.linalg.eigh(sigma)
    R = R * torch.where(torch.linalg.det(R) < 0, -1.0, 1.0).to(R)[:, None, None]  # a rotation, not a reflection
    scales = eigenvalues.clamp_min(min_scale**2).sqrt()
    scene = torch.cat([centres, scales, rotmat_to_quat(R), rgb, opacity[:, None]], -1)
    return scene, {"fx": W / 2, "fy": W / 2, "cx": W / 2, "cy": H / 2, "W": W, "H": H}


def depth_order(depth):
    """Indices sorting each image's Gaussians front to back; a stable sort breaks ties by Gaussian index."""
    return torch.sort(depth, dim=-1, stable=True).indices


def rasterize_torch(means2d, conic, depth, rgb, opacity, H, W, background=1.0):
    """Reference rasterizer: dense over all (pixel, Gaussian) pairs. Returns image [B, 3, H, W].

    Every rule of docs/design.md 3 is applied exactly so the tiled kernels agree with it to float rounding.
    Memory is O(B H W K): fine for tests and small images, slow for training (use the cpu/cuda backends);
    rasterize refuses a render that would not fit (check_dense_render).
    """
    B, K = depth.shape
    order = depth_order(depth)  # [B, K]
    take = lambda t: torch.gather(t, 1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    means2d, conic, rgb = take(means2d), take(conic), take(rgb)
    opacity = torch.gather(opacity, 1, order)

    dtype, device = means2d.dtype, means2d.device
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=device) + 0.5,
        torch.arange(W, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [HW, 2]
    d = pix[None, :, None, :] - means2d[:, None, :, :]  # [B, HW, K, 2]
    dx, dy = d[..., 0], d[..., 1]
    a, b, c = (conic[:, None, :, i] for i in range(3))  # each [B, 1, K]
    power = -0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy)  # [B, HW, K]

    alpha = opacity[:, None, :] * torch.exp(power)
    alpha = torch.where(alpha > ALPHA_MAX, torch.full_like(alpha, ALPHA_MAX), alpha)  # clamp, no gradient
    keep = (power <= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))

    # Transmittance before each Gaussian: T_i = prod_{j<i} (1 - alpha_j). T_next is non-increasing along the
    # sorted order, so "stop at the first T_next <= 1e-4" is the same as dropping every Gaussian whose
    # T_next <= 1e-4 (computed without the dropped ones, which all come after).
    one_minus = 1 - alpha
    t_next = torch.cumprod(one_minus, dim=-1)
    alpha = torch.where(t_next > T_MIN, alpha, torch.zeros_like(alpha))
    one_minus = 1 - alpha
    # T before each Gaussian and after the last, [B, HW, K + 1]; the leading 1 also makes K = 0 give the
    # background (as the kernels do), with [B, 0, .] gradients.
    t = torch.cat([one_minus.new_ones(*one_minus.shape[:-1], 1), torch.cumprod(one_minus, dim=-1)], dim=-1)
    t_before, t_final = t[..., :-1], t[..., -1:]

    weight = t_before * alpha  # [B, HW, K]
    color = weight @ rgb  # [B, HW, 3]
    image = color + t_final * background
    return image.transpose(1, 2).reshape(B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------
# Backends. "torch" is the reference above; the compiled kernels join through `_RASTERIZERS`.
#
# "cpu" (splat_cpu.cpp, OpenMP) and "cuda" (splat_cuda.cu) are tile-based: each 16 x 16 tile composites only
# the Gaussians whose culling box meets it, so the cost is pixels x Gaussians-per-pixel, not pixels x K.
# Both include splat_kernel.h, where the per-pixel forward and backward math is written once, and
# splat_checks.h, their argument checks. They are compiled on first use by torch.utils.cpp_extension.load
# (cached in ~/.cache/torch_extensions, or in $TORCH_EXTENSIONS_DIR) and share one autograd.Function.
# Projection stays in torch: the kernels take means, conics and depths, and z's gradient reaches it through
# the conic (the camera's J), exactly as in the reference; the depth sort key itself gets none.

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNEL_SOURCES = {"cpu": "splat_cpu.cpp", "cuda": "splat_cuda.cu", "cuda-sim": "splat_cuda_sim.cpp"}
_KERNEL_HEADERS = ("splat_kernel.h", "splat_checks.h")  # every local header the sources include
_SIM_FILES = ("splat_cuda.cu", "cuda_sim.h")  # what splat_cuda_sim.cpp includes besides those
_extensions = {}  # backend -> compiled module, or the exception its build raised (so it is tried once)
_warned_fallback = False


def _content_hash(paths):
    """First 16 hex digits of the SHA-256 of the files' contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _version_define(backend):
    """-DSPLAT_SOURCE_HASH=<hash of the backend's source and the headers>, passed to the compiler.

    torch.utils.cpp_extension.load reuses a cached build unless the flags or the listed source change (its
    versioner hashes only those), or ninja finds a file newer than the object. A header edited without a
    newer mtime (cp -p, tar, rsync -t, a clock behind) would slip through and the old kernel would load;
    with the contents' hash in the flags, any edit of the source or a header is a new build.
    """
    files = [_KERNEL_SOURCES[backend], *_KERNEL_HEADERS, *(_SIM_FILES if backend == "cuda-sim" else ())]
    return f"-DSPLAT_SOURCE_HASH={_content_hash([os.path.join(_HERE, f) for f in files])}"


def _cpu_simd():
    """(name suffix, compiler flags) of the cpu kernel's build for this machine.

    The kernel's per-pixel row loops are written to vectorize (splat_cpu.cpp). -fno-trapping-math lets the
    compiler evaluate both sides of a select (no FP trap is ever enabled; no result changes). Where ATen
    reports an AVX2 CPU (x86-64 with AVX2 and FMA, as nearly every one since 2013), the build also targets
    AVX2 + FMA: 8 lanes (timings: docs/experiments.md 7). That build gets its own name, so a cache shared by
    machines of different kinds (a cluster's home directory) never hands one an instruction it lacks. ATEN_CPU_CAPABILITY=default (read by torch at start-up) forces the generic build.
    """
    flags = ["-fno-trapping-math"]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        return "_avx2", flags + ["-mavx2", "-mfma"]
    return "", flags


def _cuda_arch():
    """Name suffix of the cuda kernel's build: the GPU architectures it is compiled for.

    torch.utils.cpp_extension compiles for TORCH_CUDA_ARCH_LIST when it is set, else for the compute capability
    of every visible GPU, and its cache name is ours alone. Named by them (`splat_cuda_sm90_ext` on an H100), a
    home directory shared by two kinds of GPU never hands one a binary built for the other.
    """
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:  # "8.0;9.0+PTX" -> "_arch_8_0_9_0_ptx"
        return "_arch_" + re.sub(r"[^0-9a-z]+", "_", listed.lower()).strip("_")
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "".join(f"_sm{major}{minor}" for major, minor in capabilities)


class BackendUnavailable(RuntimeError):
    """A compiled backend ("cpu", "cuda", "cuda-sim") that cannot be built or loaded here; the message holds the
    reason."""


def _load_extension(backend):
    """The compiled module of "cpu", "cuda" or "cuda-sim", built on first use; BackendUnavailable (with the
    compiler's output) if it cannot be built or loaded. Successes and failures are both remembered for the
    process."""
    if backend not in _extensions:
        try:
            if backend == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False: no GPU, or a CPU-only torch build")
            from torch.utils.cpp_extension import load

            flags = ["-O3", _version_define(backend)]
            openmp = ["-fopenmp"] if backend == "cpu" else []
            suffix, cpu_only = {"cpu": _cpu_simd, "cuda": lambda: (_cuda_arch(), [])}.get(backend, lambda: ("", []))()
            _extensions[backend] = load(
                name=f"splat_{backend.replace('-', '_')}{suffix}_ext",
                sources=[os.path.join(_HERE, _KERNEL_SOURCES[backend])],
                extra_cflags=flags + openmp + cpu_only,
                extra_cuda_cflags=flags,
                extra_ldflags=openmp,
            )
        except Exception as e:  # compiler missing, compile error, import error: all mean "not available"
            _extensions[backend] = e
    ext = _extensions[backend]
    if isinstance(ext, Exception):
        raise BackendUnavailable(f"splat backend {backend!r} is not available: {ext}") from ext
    return ext


def available_backends():
    """Backends for work on this machine: "torch" always, "cpu" if it builds, "cuda" if there is a GPU and
    it builds. Calling this compiles the kernels (once per process; cached on disk across processes).
    "cuda-sim", a simulator for tests, is not listed: it is asked for by name."""
    names = ["torch"]
    for backend in ("cpu", "cuda"):
        try:
            _load_extension(backend)
            names.append(backend)
        except RuntimeError:
            pass
    return names


class _RasterizeKernel(torch.autograd.Function):
    """rasterize with a compiled kernel. Forward saves the final T and the number of entries up to the last
    contributor per pixel plus the tile lists (never a [B, HW, K] tensor); backward walks back to front."""

    @staticmethod
    def forward(ctx, ext, means2d, conic, depth, rgb, opacity, H, W, background):
        inputs = [t.contiguous() for t in (means2d, conic, rgb, opacity)]
        order = depth_order(depth)  # the reference's stable sort: equal depths keep index order
        image, final_t, n_contrib, tile_offsets, tile_ids = ext.forward(*inputs, order, H, W, background)
        ctx.ext, ctx.background = ext, background
        ctx.save_for_backward(*inputs, final_t, n_contrib, tile_offsets, tile_ids)
        return image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image):
        grads = ctx.ext.backward(*ctx.saved_tensors, grad_image.contiguous(), ctx.background)  # [B, K, 9]
        g_means2d, g_conic, g_opacity, g_rgb = grads.split([2, 3, 1, 3], dim=-1)
        return None, g_means2d, g_conic, None, g_rgb, g_opacity.squeeze(-1), None, None, None


def _rasterize_kernel(backend, means2d, conic, depth, rgb, opacity, H, W, background=1.0):
    ext = _load_extension(backend)
    device = "cuda" if backend == "cuda" else "cpu"  # cuda-sim runs the CUDA kernels on CPU tensors
    if means2d.device.type != device:
        raise ValueError(f"backend {backend!r} needs {device} tensors, got {means2d.device}; use backend='auto'")
    return _RasterizeKernel.apply(ext, means2d, conic, depth, rgb, opacity, int(H), int(W), float(background))


def _auto_backend(device):
    """cuda for CUDA tensors, cpu for CPU tensors, else the torch reference (with one warning per process)."""
    global _warned_fallback
    kernel = device.type if device.type in ("cpu", "cuda") else None
    try:
        if kernel is None:
            raise RuntimeError(f"no compiled kernel for {device.type} tensors")
        _load_extension(kernel)
        return kernel
    except RuntimeError as e:
        if not _warned_fallback:
            _warned_fallback = True
            reason = str(e).splitlines()[0][:200]
            warnings.warn(
                f"splat: backend='auto' falls back to the slow torch reference ({reason} ...); "
                f"backend={kernel or 'cpu'!r} raises with the full compiler output",
                stacklevel=4,  # the caller of render
            )
        return "torch"


_RASTERIZERS = {
    "torch": rasterize_torch,
    "cpu": functools.partial(_rasterize_kernel, "cpu"),
    "cuda": functools.partial(_rasterize_kernel, "cuda"),
    "cuda-sim": functools.partial(_rasterize_kernel, "cuda-sim"),
}
BACKENDS = ("auto", "torch", "cpu", "cuda", "cuda-sim")


def check_opacity(opacity):
    """ValueError unless every opacity lies in [0, 1] (NaN passes: every backend skips it alike).

    The rules of docs/design.md 3 hold for any opacity, but the tiled kernels' culling box is lossless only for
    opacity <= 1: alpha >= 1/255 needs Mahalanobis distance <= sqrt(2 ln(255 opacity)), beyond 3.33 for
    opacity > 1. The cpu kernel would drop the pairs outside the box, the cuda kernel only those outside the
    box's tiles, the reference none, so three backends would give three images. model.gaussian_activation
    (a sigmoid) never leaves [0, 1]; only raw tensors passed to rasterize can, and they are refused rather
    than silently clamped. On a GPU the test costs one host sync per call.
    """
    bad = (opacity < 0) | (opacity > 1)
    if bool(bad.any()):
        values = opacity[bad]
        raise ValueError(
            f"opacity must be in [0, 1], got {values.numel()} value(s) in [{values.min().item():.4g}, "
            f"{values.max().item():.4g}]; pass valid Gaussians (model.gaussian_activation) or clamp them first"
        )


# The reference's peak memory, measured in [B, H W, K] tensors of the render's dtype: about 9 without autograd,
# 15 with it (d alone is two); rounded up. A render past the limit is refused in one line instead of an out-of-memory
# traceback: at the paper's size (224 px, 512 Gaussians, batch 32) one such tensor is 3 GiB.
DENSE_TENSORS = {False: 10, True: 16}  # keyed by "autograd records the render"
DENSE_LIMIT_CPU = 8 * 2**30  # bytes a dense render of CPU tensors may take (CUDA tensors: the GPU's free memory)


class DenseRenderTooLarge(MemoryError):
    """A torch-reference render whose dense [B, H W, K] tensors would not fit (check_dense_render)."""


def dense_bytes(B, H, W, K, dtype, autograd):
    """Estimated peak bytes of rasterize_torch: B H W K pairs x bytes per element x DENSE_TENSORS."""
    return B * H * W * K * dtype.itemsize * DENSE_TENSORS[autograd]


def dense_limit(device):
    """Bytes a dense render may take: for CUDA tensors the GPU's free memory plus what torch's cache holds
    unused, else DENSE_LIMIT_CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return DENSE_LIMIT_CPU


def check_dense_render(B, H, W, K, dtype, device, autograd, fallback=None):
    """DenseRenderTooLarge in one line when a torch-reference render would not fit (dense_bytes > dense_limit),
    saying how to get the kernel or to render smaller. fallback: why backend='auto' could not use the kernel
    (None for an explicit backend='torch', which is refused too: it would run out of memory all the same)."""
    need, limit = dense_bytes(B, H, W, K, dtype, autograd), dense_limit(device)
    if need <= limit:
        return
    if device.type == "cuda":
        kernel, where = "cuda", f"free on {device}"
        how = f"the CUDA toolkit {torch.version.cuda} (torch's CUDA version; nvcc on PATH or CUDA_HOME set)"
    else:
        kernel, where, how = "cpu", "of splat.DENSE_LIMIT_CPU", "a C++ compiler with OpenMP (g++)"
    why = f"backend='auto' fell back to it: {fallback}" if fallback else "backend='torch'"
    fix = f"install {how} so the {kernel} kernel builds" if fallback else f"use the {kernel} kernel (--splat {kernel})"
    raise DenseRenderTooLarge(
        f"splat: the dense torch reference ({why}) would need about {need / 2**30:.1f} GiB for {B} image(s) of "
        f"{H} x {W} px and {K} Gaussians, more than the {limit / 2**30:.1f} GiB {where}; {fix}, or render fewer "
        "pixels or images at once (zeroshot.py --max-size, a smaller --batch-size)")


def _fallback_reason(device):
    """The first line of why the kernel for device's tensors is not available (for check_dense_render)."""
    error = _extensions.get(device.type)
    if not isinstance(error, Exception):
        return f"no compiled kernel for {device.type} tensors"
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def rasterize(means2d, conic, depth, rgb, opacity, H, W, background=1.0, backend="auto"):
    """Dispatch to a rasterizer backend; all take and return the same tensors.

    opacity [B, K] must lie in [0, 1] (check_opacity: ValueError otherwise).

    "auto" picks cuda for CUDA tensors and cpu for CPU tensors and falls back to "torch" with one warning;
    an explicit "cpu" or "cuda" that cannot be built raises BackendUnavailable (a RuntimeError) with the
    compiler's message.
    A "torch" render, asked for or fallen back to, that would not fit in memory raises DenseRenderTooLarge
    (check_dense_render) before it allocates anything.
    float16 / bfloat16 inputs are rasterized in float32 and the image cast back (see render).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_opacity(opacity)
    fallback = None
    if backend == "auto":
        backend = _auto_backend(means2d.device)
        fallback = _fallback_reason(means2d.device) if backend == "torch" else None
    dtype = means2d.dtype
    with torch.autocast(means2d.device.type, enabled=False):  # float32 always, as in render
        tensors = [t.float() if t.dtype in REDUCED_PRECISION else t for t in (means2d, conic, depth, rgb, opacity)]
        if backend == "torch":
            autograd = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            check_dense_render(depth.shape[0], H, W, depth.shape[1], tensors[0].dtype, means2d.device, autograd,
                               fallback)
        image = _RASTERIZERS[backend](*tensors, H, W, background)
    return image.to(dtype)


REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def render(gaussians, H, W, background=1.0, backend="auto"):
    """Render valid Gaussians [B, K, 14] to images [B, 3, H, W] with the fixed camera.

    Opacity outside [0, 1] is a ValueError (check_opacity); K = 0 gives the background.

    Splatting always runs in float32 (or float64 for float64 input), also under mixed precision (--amp):
    autocast is switched off inside, float16 / bfloat16 Gaussians are cast to float32 on the way in and the
    image back to their dtype on the way out. Reduced precision would break the rules of docs/design.md 3:
    bfloat16 has 8 bits of mantissa, so 1 - alpha, T <= 1e-4 and the conic of a 0.3 px^2 footprint at
    pixel 200 would all be off by percents, and the compiled kernels take float32 and float64 only.
    """
    if gaussians.dim() != 3:
        raise ValueError(f"gaussians must be [B, K, 14], got shape {tuple(gaussians.shape)}")
    dtype = gaussians.dtype
    with torch.autocast(gaussians.device.type, enabled=False):  # project's matmuls would run in bf16
        g = gaussians.float() if dtype in REDUCED_PRECISION else gaussians
        means2d, conic, depth, rgb, opacity, _ = project(g, H, W)
        image = rasterize(means2d, conic, depth, rgb, opacity, H, W, background, backend)
    return image.to(dtype)


def random_gaussians(B, K, generator=None, dtype=torch.float32, scale_max=1.0):
    """Valid random Gaussians [B, K, 14] for tests and benchmarks (centres in [-1,1]^3, unit quaternions)."""
    r = torch.rand(B, K, PARAM_DIM, generator=generator, dtype=dtype)
    xyz = r[..., 0:3] * 2 - 1
    scale = scale_max * (0.02 + r[..., 3:6])  # world units: std up to about scale_max W/16 px
    quat = torch.nn.functional.normalize(torch.randn(B, K, 4, generator=generator, dtype=dtype), dim=-1)
    return torch.cat([xyz, scale, quat, r[..., 10:13], r[..., 13:14]], dim=-1)



