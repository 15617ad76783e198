"""Tests of splat.py, the camera and the reference rasterizer (docs/design.md sections 2-3).

The torch renderer is checked against `render_reference`, an independent per-pixel loop in plain Python
float64 written from docs/design.md directly (its own quaternion formula, explicit 2x2 inverse, sort by
(z, index), front-to-back compositing with the skip / clamp / stop rules), then by gradcheck, and by
hand-computed pixels for each compositing rule.

Run:  pytest -q tests/test_splat.py
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import splat  # noqa: E402

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# Independent reference: docs/design.md 2-3 written as a per-pixel loop.


def rotation_reference(q):
    """Unit quaternion (w, x, y, z) -> R = (w^2 - |v|^2) I + 2 v v^T + 2 w [v]_x (vector form)."""
    w, v = float(q[0]), np.asarray(q[1:], dtype=np.float64)
    cross = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return (w * w - v @ v) * np.eye(3) + 2.0 * np.outer(v, v) + 2.0 * w * cross


def project_reference(g, H, W):
    """One Gaussian [14] -> (u, v, (a, b, c), z, rgb, opacity, Sigma2)."""
    g = np.asarray(g, dtype=np.float64)
    R = rotation_reference(g[6:10])
    sigma3 = R @ np.diag(g[3:6] ** 2) @ R.T
    x, y, zc = g[0], g[1], g[2] + 8.0  # camera 8 units behind the scene (docs/design.md 2)
    fx, fy = W / 2.0, H / 2.0
    J = np.array([[fx / zc, 0.0, -fx * x / zc**2], [0.0, fy / zc, -fy * y / zc**2]])
    sigma2 = J @ sigma3 @ J.T + 0.3 * np.eye(2)
    p, q, r = sigma2[0, 0], sigma2[0, 1], sigma2[1, 1]
    det = p * r - q * q
    conic = (r / det, -q / det, p / det)
    return (x + 1) * fx, (y + 1) * fy, conic, zc, g[10:13], g[13], sigma2


def render_reference(gaussians, H, W):
    """Gaussians [K, 14] -> (image [3, H, W] float64, counts of each rule that fired)."""
    proj = [project_reference(g, H, W) for g in gaussians]
    order = sorted(range(len(proj)), key=lambda k: (proj[k][3], k))
    image = np.zeros((3, H, W))
    fired = dict(faint=0, clamped=0, stopped=0, drawn=0)
    for py in range(H):
        for px in range(W):
            T, C = 1.0, np.zeros(3)
            for k in order:
                u, v, (a, b, c), _, rgb, opacity, _ = proj[k]
                dx, dy = px + 0.5 - u, py + 0.5 - v
                power = -0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy)
                if power > 0:
                    continue
                alpha = opacity * math.exp(power)
                if alpha > 0.999:
                    alpha = 0.999
                    fired["clamped"] += 1
                if alpha < 1 / 255:
                    fired["faint"] += alpha > 0
                    continue
                T_next = T * (1 - alpha)
                if T_next <= 1e-4:
                    fired["stopped"] += 1
                    break
                C = C + T * alpha * rgb
                T = T_next
                fired["drawn"] += 1
            image[:, py, px] = C + T * 1.0
    return image, fired


def unit_quats(rng, n):
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def scene(rng, K, xy=(-1.0, 1.0), scale=(0.4, 2.4), opacity=(0.2, 0.9), z=(-1.0, 1.0)):
    """K random valid Gaussians [K, 14] with each group of parameters drawn uniformly from its range."""
    return np.concatenate(
        [
            rng.uniform(*xy, size=(K, 2)),
            rng.uniform(*z, size=(K, 1)),
            rng.uniform(*scale, size=(K, 3)),
            unit_quats(rng, K),
            rng.uniform(size=(K, 3)),
            rng.uniform(*opacity, size=(K, 1)),
        ],
        axis=1,
    )


def pixel_centre_xy(px, py, H, W):
    """World (x, y) whose projection is exactly the centre of pixel (px, py)."""
    return (px + 0.5) * 2 / W - 1, (py + 0.5) * 2 / H - 1


def scene_overlapping(rng, H, W):
    return scene(rng, 6, xy=(-0.3, 0.3), scale=(0.8, 3.2)), "drawn"


def scene_tiny(rng, H, W):
    return scene(rng, 6, scale=(0.0004, 0.0016), opacity=(0.5, 1.0)), "drawn"


def scene_huge(rng, H, W):
    return scene(rng, 4, scale=(8.0, 8.0)), "drawn"


def scene_faint(rng, H, W):
    # 0.003 < 1/255 = 0.00392 < 0.005: one is always skipped, the other drawn near its centre only.
    g = scene(rng, 4, scale=(0.8, 3.2))
    g[:, 13] = [0.003, 0.005, 0.003, 0.005]
    return g, "faint"


def scene_opaque(rng, H, W):
    g = scene(rng, 5, scale=(0.8, 2.4), opacity=(1.0, 1.0))
    g[0, 0:2] = pixel_centre_xy(1, 2, H, W)  # exp(power) = 1 at that pixel: clamped to 0.99
    return g, "clamped"


def scene_early_stop(rng, H, W):
    # Eight large Gaussians of opacity 0.95 over the same pixel: T = 0.05^n falls below 1e-4 at n = 4.
    g = scene(rng, 8, scale=(4.0, 6.4), opacity=(0.95, 0.95))
    g[:, 0:2] = pixel_centre_xy(2, 3, H, W)
    return g, "stopped"


def scene_equal_depth(rng, H, W):
    g = scene(rng, 6, xy=(-0.4, 0.4), scale=(1.6, 4.0), opacity=(0.5, 0.9), z=(0.25, 0.25))
    return g, "drawn"


def scene_outside(rng, H, W):
    g = scene(rng, 6, scale=(0.8, 2.4))
    g[:, 0] = [-1.3, 1.2, 0.0, 3.0, -5.0, 1.6]
    g[:, 1] = [0.0, -1.4, 1.5, 3.0, 0.2, 1.6]
    return g, "drawn"


SCENES = [scene_overlapping, scene_tiny, scene_huge, scene_faint, scene_opaque, scene_early_stop,
          scene_equal_depth, scene_outside]


def render64(g, H, W):
    g = torch.as_tensor(np.asarray(g), dtype=F64)
    return splat.render(g.reshape(-1, g.shape[-2], 14), H, W, backend="torch")


# ---------------------------------------------------------------------------------------------------------
# 1. Torch rasterizer == independent per-pixel loop.


@pytest.mark.parametrize("H,W", [(7, 5), (12, 9)])
@pytest.mark.parametrize("make_scene", SCENES, ids=lambda f: f.__name__)
def test_torch_render_matches_per_pixel_python_loop(make_scene, H, W):
    for seed in range(3):
        g, rule = make_scene(np.random.default_rng(seed), H, W)
        expected, fired = render_reference(g, H, W)
        assert fired[rule] > 0, f"scene {make_scene.__name__} never exercised the '{rule}' rule"
        got = render64(g, H, W)[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_reference_loop_stops_at_fourth_gaussian_of_opacity_095():
    # Sanity of the reference itself: 0.05^3 = 1.25e-4 > 1e-4 >= 0.05^4, so three Gaussians are drawn.
    g = np.zeros((5, 14))
    g[:, 0:2] = pixel_centre_xy(0, 0, 1, 1)
    g[:, 2] = np.arange(5) / 10
    g[:, 3:6], g[:, 6], g[:, 13] = 1.0, 1.0, 0.95
    g[:, 10] = [0.2, 0.4, 0.6, 0.8, 1.0]
    expected = 0.95 * (0.2 + 0.05 * 0.4 + 0.05**2 * 0.6) + 0.05**3
    image, fired = render_reference(g, 1, 1)
    assert fired["drawn"] == 3 and fired["stopped"] == 1
    assert image[0, 0, 0] == pytest.approx(expected, abs=1e-6)  # exp(power) = 1 - O(1e-6) near the centre
    assert render64(g, 1, 1)[0, 0, 0, 0].item() == pytest.approx(image[0, 0, 0], abs=1e-14)


# ---------------------------------------------------------------------------------------------------------
# 2. Gradients.


@pytest.mark.parametrize("seed", [0, 1])
def test_render_gradcheck_all_14_parameters_float64(seed):
    # Moderate sizes and opacities in (0.2, 0.8): no pixel sits on the clamp or stop thresholds.
    g = scene(np.random.default_rng(seed), 3, xy=(-0.6, 0.6), scale=(1.2, 2.8), opacity=(0.2, 0.8))
    g = torch.tensor(g, dtype=F64).unsqueeze(0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: splat.render(t, 6, 5, backend="torch"), (g,), eps=1e-6, atol=1e-6)


def test_quaternion_gradient_through_normalize_is_tangent_to_the_unit_sphere():
    rng = np.random.default_rng(3)
    g = torch.tensor(scene(rng, 3, xy=(-0.6, 0.6), scale=(1.2, 2.8)), dtype=F64).unsqueeze(0)
    raw = (torch.tensor(unit_quats(rng, 3), dtype=F64) * torch.tensor([[0.5], [2.0], [3.0]])).unsqueeze(0)
    raw.requires_grad_(True)

    def render_raw(q):
        return splat.render(torch.cat([g[..., :6], torch.nn.functional.normalize(q, dim=-1), g[..., 10:]], -1),
                            6, 5, backend="torch")

    assert torch.autograd.gradcheck(render_raw, (raw,), eps=1e-6, atol=1e-6)
    weights = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    (grad,) = torch.autograd.grad((render_raw(raw) * weights).sum(), raw)
    # f(q / |q|) is scale invariant, so its gradient is orthogonal to q and shrinks as 1 / |q|.
    assert grad.norm(dim=-1).min().item() > 1e-4
    torch.testing.assert_close((grad * raw).sum(-1), torch.zeros(1, 3, dtype=F64), rtol=0, atol=1e-14)
    unit = (raw / raw.norm(dim=-1, keepdim=True)).detach().requires_grad_(True)
    (grad_unit,) = torch.autograd.grad((render_raw(unit) * weights).sum(), unit)
    torch.testing.assert_close(grad * raw.norm(dim=-1, keepdim=True), grad_unit, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# 3. Rotation and 3-D covariance.


def special_quats():
    rng = np.random.default_rng(4)
    near_identity = np.concatenate([np.ones((20, 1)), 1e-9 * rng.normal(size=(20, 3))], axis=1)
    half_turns = np.concatenate([np.zeros((20, 1)), rng.normal(size=(20, 3))], axis=1)
    axes = np.concatenate([np.zeros((3, 1)), np.eye(3)], axis=1)  # 180 degrees about x, y, z
    q = np.concatenate([unit_quats(rng, 200), near_identity, half_turns, axes, [[1, 0, 0, 0], [-1, 0, 0, 0]]])
    return torch.nn.functional.normalize(torch.tensor(q, dtype=F64), dim=-1)


def test_covariance3d_is_symmetric_psd_with_eigenvalues_scale_squared():
    q = special_quats()
    scale = torch.tensor(np.random.default_rng(5).uniform(1e-4, 1.0, size=(len(q), 3)), dtype=F64)
    sigma = splat.covariance3d(scale, q)
    torch.testing.assert_close(sigma, sigma.transpose(-1, -2), rtol=0, atol=1e-15)
    eig = torch.linalg.eigvalsh(sigma)
    assert eig.min().item() > 0
    torch.testing.assert_close(eig, (scale**2).sort(-1).values, rtol=0, atol=1e-10)


def test_quat_to_rotmat_is_orthonormal_with_det_one_for_1000_quaternions():
    q = torch.nn.functional.normalize(torch.randn(1000, 4, generator=torch.Generator().manual_seed(6), dtype=F64))
    R = splat.quat_to_rotmat(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=F64).expand(1000, 3, 3),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(1000, dtype=F64), rtol=0, atol=1e-14)


def test_q_and_minus_q_give_the_same_rotation():
    q = special_quats()
    assert torch.equal(splat.quat_to_rotmat(q), splat.quat_to_rotmat(-q))


def test_quat_to_rotmat_rotates_like_the_quaternion_product():
    # R v == q v q* with the Hamilton product, independent of the matrix formula.
    def hamilton(p, q):
        w1, v1, w2, v2 = p[0], p[1:], q[0], q[1:]
        return np.concatenate([[w1 * w2 - v1 @ v2], w1 * v2 + w2 * v1 + np.cross(v1, v2)])

    q = special_quats()
    R = splat.quat_to_rotmat(q).numpy()
    v = np.random.default_rng(7).normal(size=(len(q), 3))
    for i in range(len(q)):
        qi = q[i].numpy()
        rotated = hamilton(hamilton(qi, np.concatenate([[0.0], v[i]])), qi * [1, -1, -1, -1])
        np.testing.assert_allclose(R[i] @ v[i], rotated[1:], rtol=0, atol=1e-13)
        np.testing.assert_allclose(R[i], rotation_reference(qi), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# 4. Camera and projection.


def gaussians_at(xyz, scale=0.01, dtype=F64):
    """[1, K, 14] white opaque-ish Gaussians at the given centres, identity rotation, isotropic scale."""
    xyz = torch.as_tensor(xyz, dtype=dtype)
    K = xyz.shape[0]
    g = torch.zeros(1, K, 14, dtype=dtype)
    g[0, :, 0:3], g[0, :, 3:6], g[0, :, 6], g[0, :, 10:13], g[0, :, 13] = xyz, scale, 1.0, 1.0, 0.5
    return g


def test_camera_maps_world_square_onto_pixel_grid():
    H, W = 12, 9
    means2d = splat.project(gaussians_at([[0, 0, 0], [-1, 0, 0], [0, 1, 0], [1, -1, 0.5]]), H, W)[0][0]
    expected = torch.tensor([[W / 2, H / 2], [0.0, H / 2], [W / 2, H], [W, 0.0]], dtype=F64)
    assert torch.equal(means2d, expected)
    assert torch.equal(splat.project(gaussians_at([[1, -1, 0.5]]), H, W)[2], torch.tensor([[8.5]], dtype=F64))


def test_small_isotropic_gaussian_at_centre_has_sigma2_of_focal_over_depth_plus_0_3():
    # At x = y = 0 the EWA Jacobian is diag(fx, fy) / zc, so an isotropic Gaussian of std s has
    # Sigma2 = diag((s fx / zc)^2, (s fy / zc)^2) + 0.3 I whatever its rotation.
    H, W, s = 12, 9, 0.08
    g = gaussians_at(torch.zeros(5, 3), scale=s)
    g[0, :, 2] = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=F64)
    g[0, :, 6:10] = special_quats()[::50][:5]  # any rotation: an isotropic Gaussian stays isotropic in 3-D
    a, b, c = splat.project(g, H, W)[1][0].unbind(-1)
    det = a * c - b * b
    sigma2 = torch.stack([c / det, -b / det, a / det], -1)  # explicit inverse of [[a, b], [b, c]]
    zc = g[0, :, 2] + 8
    expected = torch.stack([(s * W / 2 / zc) ** 2 + 0.3, 0 * zc, (s * H / 2 / zc) ** 2 + 0.3], -1)
    torch.testing.assert_close(sigma2, expected, rtol=1e-12, atol=1e-15)


def test_nearer_gaussian_of_the_same_scale_has_the_larger_footprint_by_8_over_z_plus_8():
    H, W, s = 64, 64, 1.0
    g = gaussians_at([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], scale=s)
    extent = splat.project(g, H, W)[5][0, :, 0]  # 3.33 sqrt(Sigma2_xx): grows with the std in pixels
    std = (extent / 3.33) ** 2 - 0.3  # Sigma2_xx without the 0.3 px^2 low-pass
    torch.testing.assert_close(std.sqrt(), torch.tensor([32 / 7, 32 / 8, 32 / 9], dtype=F64), rtol=1e-9, atol=0)
    assert std[0] > std[1] > std[2]  # near (z = -1) draws 9/7 as wide as far (z = 1)
    # ... and the rendered blob covers more pixels (those darker than 0.5 on the white background)
    g[0, :, 10:13], g[0, :, 13] = 0.0, 0.9
    areas = [(splat.render(g[:, i : i + 1], H, W, backend="torch") < 0.5).sum().item() for i in range(3)]
    assert areas[0] > areas[1] > areas[2] > 0


def test_culling_extent_is_3_33_sigma2_standard_deviations():
    H, W = 12, 9
    g = scene(np.random.default_rng(8), 20, scale=(0.08, 4.0))
    extent = splat.project(torch.tensor(g, dtype=F64).unsqueeze(0), H, W)[5][0].numpy()
    sigma2 = np.stack([project_reference(gi, H, W)[6] for gi in g])
    np.testing.assert_allclose(extent, 3.33 * np.sqrt(sigma2[:, [0, 1], [0, 1]]), rtol=1e-12)


def test_culling_box_contains_every_pixel_with_alpha_at_least_1_over_255():
    H, W = 48, 40
    g = scene(np.random.default_rng(9), 300, scale=(0.008, 1.2), opacity=(1.0, 1.0))
    g[:, 3] *= np.random.default_rng(10).uniform(0.02, 1.0, size=300)  # needle-like, rotated Gaussians
    means2d, conic, _, _, opacity, extent = splat.project(torch.tensor(g, dtype=F64).unsqueeze(0), H, W)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=F64) + 0.5, torch.arange(W, dtype=F64) + 0.5, indexing="ij")
    dx = xs.reshape(-1, 1) - means2d[0, :, 0]  # [HW, K]
    dy = ys.reshape(-1, 1) - means2d[0, :, 1]
    a, b, c = conic[0].unbind(-1)
    alpha = opacity[0] * torch.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))
    visible = alpha >= 1 / 255
    assert visible.sum().item() > 1000
    ratio_x = (dx.abs() / extent[0, :, 0])[visible]
    ratio_y = (dy.abs() / extent[0, :, 1])[visible]
    assert max(ratio_x.max().item(), ratio_y.max().item()) <= 1.0
    # The box is tight: sqrt(2 ln 255) / 3.33 = 0.99971 of it is reachable, and pixels come close to it.
    assert math.sqrt(2 * math.log(255)) / 3.33 == pytest.approx(0.99971, abs=1e-5)
    assert max(ratio_x.max().item(), ratio_y.max().item()) > 0.99


# ---------------------------------------------------------------------------------------------------------
# 5. Compositing rules.


def test_opaque_gaussian_at_pixel_centre_gives_0_999_rgb_plus_0_001_white_and_no_opacity_gradient():
    H, W = 8, 8
    x, y = pixel_centre_xy(3, 5, H, W)
    g = gaussians_at([[x, y, 0.0]], scale=0.4)
    g[0, 0, 10:13] = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    g[0, 0, 13] = 1.0
    g.requires_grad_(True)
    pixel = splat.render(g, H, W, backend="torch")[0, :, 5, 3]
    expected = 0.999 * torch.tensor([0.2, 0.5, 0.9], dtype=F64) + (1 - 0.999) * 1.0
    torch.testing.assert_close(pixel, expected, rtol=0, atol=1e-16)
    (grad,) = torch.autograd.grad(pixel.sum(), g)
    assert grad[0, 0, 13].item() == 0.0  # the clamp passes no gradient to opacity ...
    assert grad[0, 0, 0:10].abs().max().item() == 0.0  # ... nor to position, scale or rotation
    torch.testing.assert_close(grad[0, 0, 10:13], torch.full((3,), 0.999, dtype=F64), rtol=0, atol=1e-16)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gaussian_with_opacity_below_1_over_255_leaves_image_exactly_white(dtype):
    g = gaussians_at([[0.0, 0.0, 0.0]], scale=2.4, dtype=dtype)
    g[0, 0, 10:13], g[0, 0, 13] = 0.0, 0.5 / 255
    assert torch.equal(splat.render(g, 7, 5, backend="torch"), torch.ones(1, 3, 7, 5, dtype=dtype))


def test_offscreen_gaussians_leave_white_background_exactly():
    xyz = [[3.0, 0.0, 0.0], [-3.0, 0.5, 0.1], [0.0, 4.0, -0.3], [0.2, -3.5, 0.9], [5.0, 5.0, 0.0]]
    g = gaussians_at(xyz, scale=0.4)
    g[0, :, 10:13], g[0, :, 13] = 0.0, 1.0
    assert torch.equal(splat.render(g, 12, 9, backend="torch"), torch.ones(1, 3, 12, 9, dtype=F64))


@pytest.mark.parametrize("z_red,z_blue,front,back", [(-0.5, 0.5, 0, 2), (0.5, -0.5, 2, 0)])
def test_nearer_opaque_gaussian_hides_farther_one(z_red, z_blue, front, back):
    x, y = pixel_centre_xy(4, 4, 8, 8)
    g = gaussians_at([[x, y, z_red], [x, y, z_blue]], scale=2.4)
    g[0, :, 10:13] = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=F64)
    g[0, :, 13] = 0.98  # nearly opaque, below the 0.999 clamp
    pixel = splat.render(g, 8, 8, backend="torch")[0, :, 4, 4]
    expected = torch.full((3,), 0.02 * 0.02, dtype=F64)
    expected[front] += 0.98
    expected[back] += 0.02 * 0.98
    torch.testing.assert_close(pixel, expected, rtol=0, atol=1e-14)


def test_equal_depths_composite_in_gaussian_index_order():
    g = gaussians_at([[0.0, 0.0, 0.2], [0.0, 0.0, 0.2]], scale=2.4)
    g[0, :, 10:13] = torch.tensor([[0, 1.0, 0], [1.0, 0, 0]], dtype=F64)
    g[0, :, 13] = 0.5
    pixel = splat.render(g, 8, 8, backend="torch")[0, :, 4, 4]
    std = 2.4 * 4 / 8.2  # s fx / zc: at the image centre the EWA Jacobian is diag(fx, fy) / zc
    alpha = 0.5 * math.exp(-0.5 * 0.5**2 / (std**2 + 0.3) * 2)  # pixel centre (4.5, 4.5), mean (4, 4)
    expected = [(1 - alpha) * alpha + (1 - alpha) ** 2, alpha + (1 - alpha) ** 2, (1 - alpha) ** 2]
    torch.testing.assert_close(pixel, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-14)


def test_float32_and_float64_renders_agree_to_1e_5():
    rng = np.random.default_rng(11)
    g = np.stack([scene(rng, 12, scale=(0.16, 3.2), opacity=(0.05, 0.9)) for _ in range(3)])
    img64 = splat.render(torch.tensor(g, dtype=F64), 12, 9, backend="torch")
    img32 = splat.render(torch.tensor(g, dtype=torch.float32), 12, 9, backend="torch")
    assert img32.dtype == torch.float32
    torch.testing.assert_close(img32.double(), img64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3])
def test_clamped_gaussians_render_the_same_in_float32_and_float64(n):
    # n opaque Gaussians over one pixel centre, each alpha clamped to 0.999. With the 0.999 clamp,
    # (1 - 0.999)^2 = 1e-6 is far below the 1e-4 stop threshold, so float32 and float64 agree (under 3DGS's
    # 0.99, 0.01^2 = 1e-4 sat exactly on it and the two precisions disagreed: the old strict xfail).
    xy = pixel_centre_xy(3, 3, 8, 8)
    g = gaussians_at([[*xy, z] for z in (-0.5, 0.5, 0.9)[:n]], scale=0.4)
    g[0, :, 10:13] = torch.eye(3, dtype=F64)[:n]
    g[0, :, 13] = 1.0
    img64 = splat.render(g, 8, 8, backend="torch")
    img32 = splat.render(g.float(), 8, 8, backend="torch")
    torch.testing.assert_close(img32.double(), img64, rtol=0, atol=1e-5)
    # The front one is drawn at 0.999; the second would leave T = 0.001^2 = 1e-6 <= 1e-4, so it stops the pixel.
    expected = torch.tensor([0.999, 0.0, 0.0], dtype=F64) + 0.001  # + T * white background
    torch.testing.assert_close(img64[0, :, 3, 3], expected, rtol=0, atol=1e-12)


def test_batched_render_equals_per_image_render():
    rng = np.random.default_rng(12)
    g = torch.tensor(np.stack([scene(rng, 7, scale=(0.4, 4.0), opacity=(0.1, 1.0)) for _ in range(4)]), dtype=F64)
    g[2, :, 2] = 0.0  # one image with all depths tied
    batched = splat.render(g, 9, 12, backend="torch")
    single = torch.cat([splat.render(g[i : i + 1], 9, 12, backend="torch") for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-15)


def depth_scene(seed):
    """Six Gaussians with depths 0.3 apart (no two can swap under a small step of z) over a 9 x 7 image."""
    g = scene(np.random.default_rng(seed), 6, xy=(-0.5, 0.5), scale=(0.8, 3.2), opacity=(0.3, 0.9))
    g[:, 2] = np.random.default_rng(seed + 100).permutation(np.linspace(-0.75, 0.75, 6))
    return torch.tensor(g, dtype=F64).unsqueeze(0)


@pytest.mark.parametrize("seed", [5, 6])
def test_depth_gradient_equals_central_finite_difference_and_is_not_zero(seed):
    g = depth_scene(seed).requires_grad_()
    weights = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(seed), dtype=F64)
    f = lambda t: (splat.render(t, 9, 7, backend="torch") * weights).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(g), g)
    eps = 1e-6
    for k in range(6):
        plus, minus = g.detach().clone(), g.detach().clone()
        plus[0, k, 2] += eps
        minus[0, k, 2] -= eps
        fd = (f(plus) - f(minus)).item() / (2 * eps)
        assert grad[0, k, 2].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert grad[0, :, 2].abs().min().item() > 1e-4  # every Gaussian's depth moves the image


def test_render_gradcheck_covers_depth_float64():
    g = depth_scene(7)[..., :3].clone().requires_grad_()  # only the centres vary; z is what is new
    rest = depth_scene(7)[..., 3:]
    assert torch.autograd.gradcheck(lambda xyz: splat.render(torch.cat([xyz, rest], -1), 9, 7, backend="torch"),
                                    (g,), eps=1e-6, atol=1e-6)


def test_depth_both_orders_and_sizes():
    g = depth_scene(8)
    img = splat.render(g, 9, 7, backend="torch")
    swapped = g.clone()
    swapped[..., 2] = -swapped[..., 2]  # reversing the order (and the sizes) changes the image
    assert (splat.render(swapped, 9, 7, backend="torch") - img).abs().max() > 1e-3
