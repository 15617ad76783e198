"""Renderer fuzz (issue 10): random extreme raw decoder outputs -> model.gaussian_activation -> every backend.

No scene may give a NaN / inf pixel or gradient, or a pixel outside [0, 1]. A few hundred scenes per backend
run in CI; more with an environment variable:

    GMAE_FUZZ=5000 pytest -q tests/test_fuzz.py        (5000 scenes per backend)
"""
import os

import pytest
import torch

import model as M
import splat

N_SCENES = int(os.environ.get("GMAE_FUZZ", "300"))
SCENES_PER_BATCH = 25
EXTREMES = torch.tensor([1e4, -1e4, float("nan"), float("inf"), -float("inf"), 0.0, 30.0, -30.0])


def extreme_raw(B, generator):
    """Raw decoder outputs [B, K, 14] of random scene kinds, K random in 1..64; some entries replaced by
    +-1e4, NaN, +-inf, 0 or +-30 (saturated sigmoid / tanh)."""
    K = int(torch.randint(1, 65, (1,), generator=generator))
    raw = torch.randn(B, K, splat.PARAM_DIM, generator=generator) * 3
    # Per scene, a fraction of entries (0 to 1) becomes an extreme value.
    frac = torch.rand(B, 1, 1, generator=generator)
    hit = torch.rand(B, K, splat.PARAM_DIM, generator=generator) < frac
    pick = EXTREMES[torch.randint(len(EXTREMES), (B, K, splat.PARAM_DIM), generator=generator)]
    raw = torch.where(hit, pick, raw)
    kind = torch.randint(6, (B,), generator=generator)
    for b in range(B):
        if kind[b] == 1:  # all Gaussians on one spot (one pixel), at one depth
            raw[b, :, 0:3] = raw[b, :1, 0:3]
        elif kind[b] == 2:  # depth ties only
            raw[b, :, 2] = raw[b, 0, 2]
        elif kind[b] == 3:  # degenerate scales: zero or one axis collapsed; opacity 0 or 1
            raw[b, :, 3 + int(torch.randint(3, (1,), generator=generator))] = -1e4
            raw[b, :, 13] = 1e4 if b % 2 else -1e4
        elif kind[b] == 4:  # centres pushed off the image edges
            raw[b, :, 0:2] = torch.where(torch.rand(K, 2, generator=generator) < 0.5, 1e4, -1e4)
        elif kind[b] == 5:  # every value the same extreme
            raw[b] = EXTREMES[int(torch.randint(len(EXTREMES), (1,), generator=generator))]
    return raw


@pytest.mark.parametrize("backend", splat.available_backends())
def test_extreme_scenes_give_finite_images_and_gradients(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    gen = torch.Generator().manual_seed(2025)
    tried, bad = 0, []
    while tried < N_SCENES:
        B = min(SCENES_PER_BATCH, N_SCENES - tried)
        H, W = (int(v) for v in torch.randint(1, 33, (2,), generator=gen))
        scale_max = float(torch.tensor([0.5, 1.0, 2.0])[torch.randint(3, (1,), generator=gen)])
        raw = extreme_raw(B, gen).to(device).requires_grad_(True)
        image = splat.render(M.gaussian_activation(raw, scale_max), H, W, backend=backend)
        weights = torch.randn(image.shape, generator=gen).to(device)
        (image * weights).sum().backward()
        finite = image.isfinite().flatten(1).all(1) & raw.grad.isfinite().flatten(1).all(1)
        in_range = ((image >= -1e-5) & (image <= 1 + 1e-5)).flatten(1).all(1)
        bad += [tried + b for b in range(B) if not (finite[b] and in_range[b])]
        tried += B
    print(f"fuzz {backend}: {tried} scenes, {len(bad)} with NaN/inf or out of range")
    assert tried == N_SCENES and bad == []


def test_activation_of_nan_and_inf_is_valid_and_passes_no_gradient_to_them():
    raw = torch.tensor([[float("nan"), float("inf"), -float("inf")] + [1e4] * 5 + [-1e4] * 6]).requires_grad_(True)
    g = M.gaussian_activation(raw)
    assert g.isfinite().all()
    assert g[0, :3].tolist() == [0.0, 1.0, -1.0]  # NaN -> 0 -> tanh 0; +-inf -> +-1e4 -> +-1
    assert torch.allclose(g[0, 6:10].norm(), torch.tensor(1.0))  # quaternion (1e4, 1e4, -1e4, -1e4) normalised
    g.sum().backward()
    assert raw.grad.isfinite().all() and raw.grad[0, :3].tolist() == [0.0, 0.0, 0.0]
