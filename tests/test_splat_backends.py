"""Tests of the compiled splatting backends (splat_cpu.cpp, splat_cuda.cu; docs/design.md 3-4).

The torch reference `rasterize_torch` is the spec (tests/test_splat.py checks it against a per-pixel loop and
gradcheck). Every compiled backend must give the same image and the same gradients w.r.t. all 14 valid
Gaussian parameters through `splat.render`, compared with the float64 reference: to float32 rounding for
float32 inputs, to ~1e-10 for float64 inputs. Scenes cover the random case and each rule's corner: the 0.999
clamp, the T <= 1e-4 stop, opacity 0, tiny and off-image Gaussians, depth ties, K = 1 and K = 4096, odd
image sizes. A short Adam run checks that training with the cpu kernel follows the reference.

"cpu" must build wherever a C++ compiler is (a failed build FAILS here, it is not skipped); "cuda" runs
only where torch sees a GPU. "cuda-sim" is splat_cuda.cu itself, compiled for the CPU and run one GPU thread at a
time by cuda_sim.h: every test here runs it under two schedules (warp-greedy: one warp as far as the barriers
let it before the next; shuffled), so the CUDA source is checked on every machine. The one-time compiles
(about 20 s each) are cached on disk by torch.

Run:  pytest -q tests/test_splat_backends.py
"""
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.utils.cpp_extension

import splat

F64 = torch.float64

KERNELS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda backend needs a CUDA GPU (none here)"),
    ),
    "cuda-sim@warp-greedy:1",  # backend@CUDA_SIM_SCHEDULE
    "cuda-sim@shuffled:2",
]

# Float32 kernels vs the float64 reference: the difference is float32 rounding in projection and compositing,
# measured at ~5e-7 (as large as the float32 reference's own). The gradient floor is relative to the largest
# entry (d/dx carries a factor W/2 px per unit).
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5),
    F64: dict(rtol=1e-10, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-10),
}


@pytest.fixture(scope="module", params=KERNELS)
def backend(request):
    """A compiled backend, built once per test session (and cached on disk across sessions); cuda-sim runs
    under the schedule its parameter names."""
    name, _, schedule = request.param.partition("@")
    splat._load_extension(name)  # raises RuntimeError with the compiler output: the test fails
    with pytest.MonkeyPatch.context() as env:
        if schedule:
            env.setenv("CUDA_SIM_SCHEDULE", schedule)
        yield name


def device_of(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


def render_and_grad(g, H, W, backend, weights):
    """Image [B, 3, H, W] and dL/dg [B, K, 14] for L = sum(weights * image); both returned as float64 CPU."""
    g = g.to(device_of(backend)).detach().requires_grad_()
    image = splat.render(g, H, W, backend=backend)
    (image * weights.to(image)).sum().backward()
    return image.detach().cpu().to(F64), g.grad.cpu().to(F64)


def assert_matches_reference(g, H, W, backend, seed=0):
    """Render g with `backend` in g's dtype and with the float64 reference; compare image and gradients."""
    weights = torch.rand(g.shape[0], 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref_image, ref_grad = render_and_grad(g.to(F64), H, W, "torch", weights)
    image, grad = render_and_grad(g, H, W, backend, weights)
    tol = TOL[g.dtype]
    torch.testing.assert_close(image, ref_image, rtol=tol["rtol"], atol=tol["atol"])
    scale = max(1.0, ref_grad.abs().max().item())
    torch.testing.assert_close(grad, ref_grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"] * scale)
    return image, grad


def gaussians_from(xyz, scale, rgb, opacity, dtype=F64):
    """Valid Gaussians [1, K, 14] with identity rotation from per-Gaussian lists."""
    K = len(xyz)
    quat = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * K, dtype=dtype)
    t = lambda v: torch.as_tensor(v, dtype=dtype).reshape(K, -1)  # noqa: E731
    return torch.cat([t(xyz), t(scale).expand(K, 3), quat, t(rgb), t(opacity)], dim=-1)[None]


def pixel_centre(i, n):
    """World coordinate of the centre of pixel i along an axis of n pixels (docs/design.md 2)."""
    return (i + 0.5) * 2 / n - 1


# ---------------------------------------------------------------------------------------------------------
# Agreement with the reference, scene by scene.


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B, K, H, W", [(3, 64, 33, 17), (2, 256, 32, 32), (1, 40, 16, 48), (2, 30, 5, 37)])
def test_random_scenes_match_reference(backend, dtype, B, K, H, W):
    g = splat.random_gaussians(B, K, generator=torch.Generator().manual_seed(B * K + H), dtype=dtype)
    assert_matches_reference(g, H, W, backend)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_4096_gaussians_match_reference(backend, dtype):
    g = splat.random_gaussians(2, 4096, generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert_matches_reference(g, 16, 16, backend)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_single_gaussian_matches_reference(backend, dtype):
    g = gaussians_from([[0.1, -0.2, 0.0]], [0.8], [[0.2, 0.5, 0.9]], [0.7], dtype=dtype)
    assert_matches_reference(g, 12, 10, backend)


def test_large_scale_gaussians_match_reference(backend):
    g = splat.random_gaussians(2, 48, generator=torch.Generator().manual_seed(3), dtype=F64, scale_max=2.0)
    assert_matches_reference(g, 24, 24, backend)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_near_zero_scale_matches_reference(backend, dtype):
    # Sigma2 is then the 0.3 px^2 of the low-pass filter alone: footprints of about one pixel.
    g = splat.random_gaussians(2, 64, generator=torch.Generator().manual_seed(4), dtype=dtype)
    g[..., 3:6] = 1e-7
    assert_matches_reference(g, 19, 21, backend)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opacity_zero_and_one_match_reference(backend, dtype):
    g = splat.random_gaussians(2, 80, generator=torch.Generator().manual_seed(5), dtype=dtype)
    g[:, 0::3, 13] = 0.0  # never pass the alpha test
    g[:, 1::3, 13] = 1.0  # clamped to 0.999 near their centres
    _, grad = assert_matches_reference(g, 20, 20, backend)
    assert torch.all(grad[:, 0::3] == 0)


def test_clamped_alpha_passes_no_gradient_to_opacity(backend):
    # One opaque Gaussian centred on pixel (3, 2): alpha = min(0.999, 1 * exp(0)) = 0.999 there.
    H, W = 6, 8
    g = gaussians_from([[pixel_centre(3, W), pixel_centre(2, H), 0.0]], [0.08], [[0.2, 0.4, 0.6]], [1.0])
    g = g.to(device_of(backend)).requires_grad_()
    pixel = splat.render(g, H, W, backend=backend)[0, :, 2, 3]
    expected = 0.999 * torch.tensor([0.2, 0.4, 0.6], dtype=F64) + 0.001
    torch.testing.assert_close(pixel.detach().cpu(), expected, rtol=0, atol=1e-14)
    pixel.sum().backward()
    # Through this pixel alone opacity, mean, depth and scale get nothing; rgb gets alpha * T = 0.999 each.
    grad = g.grad[0, 0].cpu()
    assert torch.all(grad[[0, 1, 2, 3, 4, 5, 13]] == 0)
    torch.testing.assert_close(grad[10:13], torch.full((3,), 0.999, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_depth_gradient_matches_reference_and_is_not_zero(backend, dtype):
    # z reaches the image through the footprint (the camera's J in splat.project): the kernel's conic
    # gradient must carry it exactly as the reference does. Depths 0.1 apart: no re-ordering.
    g = splat.random_gaussians(2, 20, generator=torch.Generator().manual_seed(15), dtype=dtype)
    g[..., 2] = torch.linspace(-0.95, 0.95, 20, dtype=dtype)[torch.randperm(20, generator=torch.Generator().manual_seed(16))]
    _, grad = assert_matches_reference(g, 24, 24, backend)
    assert (grad[..., 2].abs() > 0).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_off_image_gaussians_match_reference(backend, dtype):
    g = splat.random_gaussians(2, 60, generator=torch.Generator().manual_seed(6), dtype=dtype)
    g[:, 0::4, 0] = 3.0  # far right
    g[:, 1::4, 1] = -2.5  # far above
    g[:, 2::4, 0] = -1.04  # centre just left of the image, footprint still inside
    _, grad = assert_matches_reference(g, 17, 23, backend)
    assert torch.all(grad[:, 0::4] == 0) and torch.all(grad[:, 1::4] == 0)


def test_all_off_image_gives_background(backend):
    g = splat.random_gaussians(1, 10, generator=torch.Generator().manual_seed(7), dtype=F64)
    g[..., 0] = 5.0
    image, grad = assert_matches_reference(g, 9, 11, backend)
    assert torch.equal(image, torch.ones_like(image)) and torch.all(grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_depth_ties_match_reference(backend, dtype):
    # Four depth values shared by 100 Gaussians: the order within a tie is the Gaussian index.
    g = splat.random_gaussians(2, 100, generator=torch.Generator().manual_seed(8), dtype=dtype)
    g[..., 2] = torch.randint(0, 4, (2, 100), generator=torch.Generator().manual_seed(9)).to(dtype) / 4
    assert_matches_reference(g, 16, 16, backend)


def test_equal_depth_lower_index_is_in_front(backend):
    # Two Gaussians with alpha 0.9 at the pixel, same z: pixel = 0.9 c_first + 0.1 * 0.9 c_second + 0.01.
    H, W = 4, 4
    centre = [pixel_centre(1, W), pixel_centre(2, H), 0.25]
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    for colours in ([red, blue], [blue, red]):
        g = gaussians_from([centre, centre], [0.08, 0.08], colours, [0.9, 0.9]).to(device_of(backend))
        pixel = splat.render(g, H, W, backend=backend)[0, :, 2, 1].cpu()
        first, second = torch.tensor(colours[0], dtype=F64), torch.tensor(colours[1], dtype=F64)
        torch.testing.assert_close(pixel, 0.9 * first + 0.09 * second + 0.01, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_early_stop_under_50_opaque_gaussians(backend, dtype):
    # 50 Gaussians centred on pixel (3, 3), front to back, each alpha 0.95 there. T after n of them is
    # 0.05^n: 0.05, 0.0025, 1.25e-4, then 6.25e-6 <= 1e-4, so the 4th stops the pixel and is excluded.
    H = W = 8
    K = 50
    xyz = [[pixel_centre(3, W), pixel_centre(3, H), k / K] for k in range(K)]
    rgb = torch.rand(K, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    g = gaussians_from(xyz, [0.016] * K, rgb, [0.95] * K, dtype=dtype)
    image, grad = assert_matches_reference(g, H, W, backend)

    rgb = rgb.to(dtype).to(F64)  # the colours the kernel saw
    expected = sum(0.05**i * 0.95 * rgb[i] for i in range(3)) + 0.05**3
    torch.testing.assert_close(image[0, :, 3, 3], expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-13)
    # Behind the stop the centre pixel passes no gradient.
    only_centre = torch.zeros(1, 3, H, W, dtype=F64)
    only_centre[0, :, 3, 3] = 1
    _, grad_centre = render_and_grad(g, H, W, backend, only_centre)
    assert torch.all(grad_centre[0, 3:] == 0) and torch.all(grad_centre[0, :3, 10:13] != 0)
    # One pixel to the right, alpha = 0.95 exp(-0.5 / Sigma2_xx) = 0.1795 (Sigma2_xx = 0.3 + 16 * 0.002^2):
    # T = 0.8205^n is 1.1e-4 after 46 Gaussians and 9.1e-5 after 47, so the 47th stops that pixel.
    only_right = torch.zeros(1, 3, H, W, dtype=F64)
    only_right[0, :, 3, 4] = 1
    _, grad_right = render_and_grad(g, H, W, backend, only_right)
    assert torch.all(grad_right[0, 46:] == 0) and torch.all(grad_right[0, :46, 10:13] != 0)


# ---------------------------------------------------------------------------------------------------------
# Interface: dispatch, fallback, errors, what is saved, determinism.


def test_auto_picks_the_kernel_for_the_device(backend):
    g = splat.random_gaussians(1, 20, generator=torch.Generator().manual_seed(11)).to(device_of(backend))
    picked = "cpu" if backend == "cuda-sim" else backend  # the simulator is never picked: it is for tests
    kernel = splat.render(g, 9, 9, backend=picked)
    assert torch.equal(splat.render(g, 9, 9, backend="auto"), kernel)
    assert picked in splat.available_backends() and "cuda-sim" not in splat.available_backends()


def test_failed_build_falls_back_once_and_explicit_use_raises(monkeypatch):
    monkeypatch.setitem(splat._extensions, "cpu", OSError("g++: fatal error: no input files"))
    monkeypatch.setattr(splat, "_warned_fallback", False)
    g = splat.random_gaussians(1, 8, generator=torch.Generator().manual_seed(12))
    with pytest.warns(UserWarning, match="falls back"):
        image = splat.render(g, 8, 8, backend="auto")
    assert torch.equal(image, splat.render(g, 8, 8, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        splat.render(g, 8, 8, backend="auto")
    with pytest.raises(RuntimeError, match="no input files"):
        splat.render(g, 8, 8, backend="cpu")
    assert "cpu" not in splat.available_backends()


def test_kernel_rejects_tensors_on_the_wrong_device():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            splat.render(torch.rand(1, 4, 14), 8, 8, backend="cuda")
    else:
        with pytest.raises(ValueError, match="needs cpu tensors"):
            splat.render(torch.rand(1, 4, 14, device="cuda"), 8, 8, backend="cpu")


def test_saves_no_per_pixel_gaussian_tensor(backend):
    B, K, H, W = 2, 256, 32, 32
    g = splat.random_gaussians(B, K, generator=torch.Generator().manual_seed(13)).to(device_of(backend))
    image = splat.render(g.requires_grad_(), H, W, backend=backend)
    saved = image.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) < B * H * W * K / 100


def test_cpu_gradients_do_not_depend_on_thread_count():
    splat._load_extension("cpu")
    g = splat.random_gaussians(4, 200, generator=torch.Generator().manual_seed(14))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(render_and_grad(g, 40, 40, "cpu", torch.ones(4, 3, 40, 40)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_build_is_named_for_its_instruction_set():
    simd, flags = splat._cpu_simd()
    assert splat._load_extension("cpu").__name__ == f"splat_cpu{simd}_ext"
    assert "-fno-trapping-math" in flags and (("-mavx2" in flags) == (simd == "_avx2"))


def test_generic_cpu_build_matches_reference_too():
    """The build without AVX2 (what a CPU without it gets) runs this file's reference comparisons as well."""
    if not splat._cpu_simd()[0]:
        pytest.skip("this machine already uses the generic build: every other test here covers it")
    tests = ("random_scenes_match_reference or 4096_gaussians or early_stop or training_curve or thread_count "
             "or named_for_its_instruction_set")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          f"cpu and ({tests})"], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                         cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Training through the kernel follows the reference.


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_training_curve_matches_reference(backend, dtype):
    # 20 Adam steps on 48 Gaussians toward a three-colour target, from one init with each backend.
    from model import gaussian_activation  # the one raw -> valid map (docs/design.md 1)

    H = W = 16
    target = torch.ones(1, 3, H, W, dtype=dtype)
    target[:, :, :, : W // 2] = torch.tensor([0.9, 0.2, 0.1], dtype=dtype)[:, None, None]
    target[:, :, H // 2 :, W // 2 :] = torch.tensor([0.1, 0.3, 0.8], dtype=dtype)[:, None, None]
    init = torch.randn(1, 48, 14, generator=torch.Generator().manual_seed(15), dtype=F64).to(dtype)
    device = device_of(backend)

    def losses(name):
        raw = init.clone().to(device).requires_grad_()
        opt = torch.optim.Adam([raw], lr=0.05)
        curve = []
        for _ in range(20):
            image = splat.render(gaussian_activation(raw), H, W, backend=name)
            loss = ((image - target.to(device)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return curve

    reference, kernel = losses("torch"), losses(backend)
    assert kernel == pytest.approx(reference, rel=1e-4)
    assert kernel[-1] < 0.5 * kernel[0] and math.isfinite(kernel[-1])


# ---------------------------------------------------------------------------------------------------------
# Edge cases every backend must handle alike: no Gaussians, opacity outside [0, 1], malformed backward input.

ALL_BACKENDS = ["torch", *KERNELS[:2], "cuda-sim"]


def loaded(backend):
    if backend != "torch":
        splat._load_extension(backend)  # a failed cpu or cuda-sim build fails the test
    return backend


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_gaussians_render_the_background_with_empty_gradients(name, dtype):
    backend = loaded(name)
    g = torch.zeros(2, 0, 14, dtype=dtype, device=device_of(backend), requires_grad=True)
    image = splat.render(g, 5, 7, background=0.25, backend=backend)
    assert image.shape == (2, 3, 5, 7) and torch.all(image == 0.25)
    image.sum().backward()
    assert g.grad.shape == (2, 0, 14)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_zero_images_render_an_empty_batch(name):
    backend = loaded(name)
    g = torch.rand(0, 6, 14, dtype=F64, device=device_of(backend), requires_grad=True)
    image = splat.render(g, 4, 3, backend=backend)
    assert image.shape == (0, 3, 4, 3)
    image.sum().backward()
    assert g.grad.shape == (0, 6, 14)


def test_zero_gaussians_agree_across_backends():
    g = torch.zeros(3, 0, 14, dtype=F64)
    weights = torch.rand(3, 3, 9, 4, generator=torch.Generator().manual_seed(20), dtype=F64)
    ref_image, ref_grad = render_and_grad(g, 9, 4, "torch", weights)
    assert torch.equal(ref_image, torch.ones(3, 3, 9, 4, dtype=F64)) and ref_grad.shape == (3, 0, 14)
    for backend in [*splat.available_backends(), "cuda-sim"]:
        image, grad = render_and_grad(g, 9, 4, backend, weights)
        assert torch.equal(image, ref_image) and grad.shape == ref_grad.shape, backend


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [1.5, 1 + 1e-6, -0.2])
def test_opacity_outside_0_1_is_a_value_error(name, bad):
    # The culling box is lossless only for opacity <= 1 (splat.check_opacity): above it the cpu kernel (box),
    # the cuda kernel (whole tiles) and the reference (every pixel) would give three different images.
    backend = loaded(name)
    g = splat.random_gaussians(2, 10, generator=torch.Generator().manual_seed(21), dtype=F64).to(device_of(backend))
    g[1, 3, 13] = bad
    with pytest.raises(ValueError, match=r"opacity must be in \[0, 1\]"):
        splat.render(g, 8, 8, backend=backend)
    means2d, conic, depth, rgb, opacity, _ = splat.project(g, 8, 8)
    with pytest.raises(ValueError, match=r"opacity must be in \[0, 1\]"):
        splat.rasterize(means2d, conic, depth, rgb, opacity, 8, 8, backend=backend)
    g[1, 3, 13] = 1.0  # the bounds themselves are valid
    g[0, 2, 13] = 0.0
    image = splat.render(g, 8, 8, backend=backend)
    g[0, 2, 13] = float("nan")  # NaN passes the check and, like opacity 0, draws nothing
    assert image.isfinite().all() and torch.equal(splat.render(g, 8, 8, backend=backend), image)


def test_opacity_above_one_would_make_the_cpu_kernel_differ_from_the_reference():
    # Why it is refused: opacity 3 reaches alpha >= 1/255 out to Mahalanobis distance sqrt(2 ln 765) = 3.65,
    # beyond the 3.33 box, so the reference draws pixels the cpu kernel culls.
    splat._load_extension("cpu")
    g = gaussians_from([[0.0, 0.0, 0.0]], [1.0], [[0.0, 0.0, 0.0]], [3.0])
    means2d, conic, depth, rgb, opacity, _ = splat.project(g, 32, 32)
    ref = splat.rasterize_torch(means2d, conic, depth, rgb, opacity, 32, 32)
    cpu = splat._rasterize_kernel("cpu", means2d, conic, depth, rgb, opacity, 32, 32)
    assert (ref - cpu).abs().max() > 1e-3


def test_non_contiguous_upstream_gradient_matches_reference(backend):
    # A loss read through a permuted view hands backward a non-contiguous grad_image; splat.py makes it contiguous.
    g = splat.random_gaussians(2, 30, generator=torch.Generator().manual_seed(22), dtype=F64)
    weights = torch.rand(2, 11, 13, 3, generator=torch.Generator().manual_seed(23), dtype=F64)
    grads = []
    for name in ("torch", backend):
        x = g.to(device_of(name)).requires_grad_()
        (splat.render(x, 11, 13, backend=name).permute(0, 2, 3, 1) * weights.to(x.device)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def saved_for_backward(backend, B=2, K=12, H=20, W=18):
    """The extension, its inputs and what its forward saved, plus a valid grad_image, as a dict."""
    ext = splat._load_extension(backend)
    g = splat.random_gaussians(B, K, generator=torch.Generator().manual_seed(24)).to(device_of(backend))
    means2d, conic, depth, rgb, opacity, _ = splat.project(g, H, W)
    inputs = [t.contiguous() for t in (means2d, conic, rgb, opacity)]
    _, final_T, n_contrib, tile_offsets, tile_ids = ext.forward(*inputs, splat.depth_order(depth), H, W, 1.0)
    saved = dict(final_T=final_T, n_contrib=n_contrib, tile_offsets=tile_offsets, tile_ids=tile_ids,
                 grad_image=torch.ones(B, 3, H, W, device=g.device))
    return ext, inputs, saved


def call_backward(ext, inputs, saved, **replace):
    s = saved | replace
    names = ("final_T", "n_contrib", "tile_offsets", "tile_ids", "grad_image")
    return ext.backward(*inputs, *(s[n] for n in names), 1.0)


def test_backward_accepts_what_forward_saved(backend):
    ext, inputs, saved = saved_for_backward(backend)
    assert call_backward(ext, inputs, saved).shape == (2, 12, 9)


@pytest.mark.parametrize(
    "name, make_bad, message",
    [
        ("grad_image", lambda t: t[:, :, :-1].contiguous(), r"grad_image must be .*\[2, 3, 20, 18\]"),
        ("grad_image", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "grad_image must be contiguous"),
        ("grad_image", lambda t: t.double(), "grad_image must be Float"),
        ("final_T", lambda t: t[:1], r"final_T must be \[B, H, W\] with B = 2"),
        ("final_T", lambda t: t.double(), "final_T must be Float"),
        ("final_T", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "final_T must be contiguous"),
        ("n_contrib", lambda t: t.long(), "n_contrib must be int32"),
        ("n_contrib", lambda t: t[:, :-1].contiguous(), r"n_contrib must be int32 \[2, 20, 18\]"),
        ("tile_offsets", lambda t: t[:-1], r"tile_offsets must be int64 \[B \* n_tiles \+ 1\] = \[9\]"),
        ("tile_offsets", lambda t: t.int(), "tile_offsets must be int64"),
        ("tile_ids", lambda t: t.long(), "tile_ids must be int32"),
        ("tile_ids", lambda t: t.repeat(2)[::2], "tile_ids must be contiguous"),
    ],
)
def test_backward_rejects_malformed_saved_tensors_and_gradient(backend, name, make_bad, message):
    ext, inputs, saved = saved_for_backward(backend)
    with pytest.raises(RuntimeError, match=message):
        call_backward(ext, inputs, saved, **{name: make_bad(saved[name])})


def test_cpu_backward_rejects_tile_offsets_that_disagree_with_tile_ids():
    ext, inputs, saved = saved_for_backward("cpu")
    offsets = saved["tile_offsets"].clone()
    offsets[-1] += 1
    with pytest.raises(RuntimeError, match=r"tile_offsets must run from 0 to tile_ids.numel\(\)"):
        call_backward(ext, inputs, saved, tile_offsets=offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put a saved tensor on the other device")
def test_cuda_backward_rejects_saved_tensors_on_the_cpu():
    ext, inputs, saved = saved_for_backward("cuda")
    for name in saved:
        with pytest.raises(RuntimeError, match=f"{name} must be on cuda"):
            call_backward(ext, inputs, saved, **{name: saved[name].cpu()})


def forward_args(backend, B=2, K=12, H=20, W=18):
    """The extension and a valid (means2d, conic, rgb, opacity, order) for its forward, as a dict."""
    ext = splat._load_extension(backend)
    g = splat.random_gaussians(B, K, generator=torch.Generator().manual_seed(25)).to(device_of(backend))
    means2d, conic, depth, rgb, opacity, _ = splat.project(g, H, W)
    args = dict(means2d=means2d, conic=conic, rgb=rgb, opacity=opacity, order=splat.depth_order(depth))
    return ext, {name: t.contiguous() for name, t in args.items()}


@pytest.mark.parametrize(
    "name, make_bad, message",
    [
        ("means2d", lambda t: t.to("meta"), "splat {backend} backend needs {DEVICE} tensors, got meta"),
        ("conic", lambda t: t.to("meta"), "splat {backend} backend: inputs must be on one {DEVICE} device: conic is "
                                          "on meta"),
        ("conic", lambda t: t[:, :-1].contiguous(), r"conic must be \[B, K, 3\], got \[2, 11, 3\]"),
        ("rgb", lambda t: t.double(), "all inputs must share one dtype: rgb is Double, means2d Float"),
        ("opacity", lambda t: t.repeat(1, 2)[:, ::2], "inputs must be contiguous, opacity is not"),
        ("order", lambda t: t.int(), r"order must be a contiguous int64 \[B, K\] tensor"),
        ("order", lambda t: t.to("meta"), "order must be .* on the inputs' device"),
    ],
)
def test_forward_rejects_malformed_inputs(backend, name, make_bad, message):
    ext, args = forward_args(backend)
    args[name] = make_bad(args[name])
    with pytest.raises(RuntimeError, match=message.format(backend=backend, DEVICE=device_of(backend).type.upper())):
        ext.forward(*args.values(), 20, 18, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The on-disk build cache: an edited header must give a new build.


def test_kernel_headers_are_every_local_include():
    included = set()
    for name in [*splat._KERNEL_SOURCES.values(), *splat._KERNEL_HEADERS, *splat._SIM_FILES]:
        with open(os.path.join(splat._HERE, name)) as f:
            included |= set(re.findall(r'^#include "([^"]+)"', f.read(), flags=re.M))
    assert included == {*splat._KERNEL_HEADERS, *splat._SIM_FILES}


def test_version_define_changes_with_each_header_even_at_an_old_mtime(monkeypatch, tmp_path):
    files = {*splat._KERNEL_SOURCES.values(), *splat._KERNEL_HEADERS, *splat._SIM_FILES}
    for name in files:
        shutil.copy2(os.path.join(splat._HERE, name), tmp_path / name)
    monkeypatch.setattr(splat, "_HERE", str(tmp_path))
    before = {b: splat._version_define(b) for b in ("cpu", "cuda", "cuda-sim")}
    assert re.fullmatch(r"-DSPLAT_SOURCE_HASH=[0-9a-f]{16}", before["cpu"]) and len(set(before.values())) == 3
    # Which builds each file is part of: the simulator's build compiles splat_cuda.cu and cuda_sim.h too.
    users = {"splat_cpu.cpp": {"cpu"}, "splat_cuda.cu": {"cuda", "cuda-sim"}, "splat_cuda_sim.cpp": {"cuda-sim"},
             "cuda_sim.h": {"cuda-sim"}, **{h: set(before) for h in splat._KERNEL_HEADERS}}
    assert set(users) == files
    for name in sorted(files):
        path, text, mtime = tmp_path / name, (tmp_path / name).read_bytes(), os.stat(tmp_path / name).st_mtime_ns
        path.write_bytes(text + b"\n")
        os.utime(path, ns=(mtime, mtime))  # the mtime ninja compares is unchanged: only the flags tell
        assert {b for b in before if splat._version_define(b) != before[b]} == users[name], name
        path.write_bytes(text)
        assert {b: splat._version_define(b) for b in before} == before


def test_load_passes_the_version_define_to_the_compiler(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    monkeypatch.setattr(splat, "_extensions", {})
    assert splat._load_extension("cpu") == "module"
    define = splat._version_define("cpu")
    assert define in calls[0]["extra_cflags"] and define in calls[0]["extra_cuda_cflags"]
