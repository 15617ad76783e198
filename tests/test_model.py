"""model.py: masking, position embeddings, the Gaussian head, decoders, loss and config checks."""
import pytest
import torch

import model as M
import splat


def small_config(**kw):
    base = dict(img_size=16, patch_size=4, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1,
                dec_heads=2, num_gaussians=16)
    base.update(kw)
    return M.GMAEConfig(**base)


def test_patchify_unpatchify_round_trip_and_patch_layout():
    x = torch.rand(2, 3, 12, 8)
    p = M.patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(M.unpatchify(p, 4, 12, 8), x)
    # patch 1 is the second patch of the first row: columns 4..7, rows 0..3, (row, col, channel) order
    assert torch.equal(p[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_n_times_one_minus_m_patches(ratio):
    x = torch.randn(5, 64, 8)
    vis, mask, ids_restore, ids_keep = M.random_masking(x, ratio)
    n_keep = int(64 * (1 - ratio))
    assert vis.shape == (5, n_keep, 8)
    assert (mask.sum(1) == 64 - n_keep).all()
    # the visible tokens are the unmasked ones, and ids_restore inverts the shuffle
    for b in range(5):
        kept = ids_keep[b]
        assert torch.equal(vis[b], x[b, kept])
        assert (mask[b, kept] == 0).all()
    assert (torch.sort(ids_restore, 1).values == torch.arange(64)).all()


def test_masking_differs_per_sample():
    _, mask, _, _ = M.random_masking(torch.randn(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_mask_ratio_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="would leave the encoder no patch"):
        M.random_masking(torch.randn(1, 16, 4), 1.0)
    with pytest.raises(ValueError, match="--mask"):
        small_config(mask_ratio=1.0)
    with pytest.raises(ValueError, match="keeps no visible patch"):
        small_config(mask_ratio=0.99)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="--gaussians must be in 1..4096, got 0"):
        small_config(num_gaussians=0)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        small_config(img_size=18, patch_size=4)
    with pytest.raises(ValueError, match="--decoder"):
        small_config(decoder="voxels")


def test_sincos_pos_embed_is_distinct_per_patch_and_bounded():
    pe = M.sincos_pos_embed(32, 4)
    assert pe.shape == (1, 17, 32)
    assert torch.equal(pe[0, 0], torch.zeros(32))
    assert pe.abs().max() <= 1.0
    d = torch.cdist(pe[0, 1:], pe[0, 1:])
    assert d[~torch.eye(16, dtype=torch.bool)].min() > 0.1
    # first half encodes the column (w), second half the row (h): patches in one column share the second half
    assert torch.allclose(pe[0, 1, 16:], pe[0, 2, 16:]) and not torch.allclose(pe[0, 1, 16:], pe[0, 5, 16:])


def test_gaussian_activation_gives_valid_parameters():
    raw = torch.randn(4, 100, 14) * 10
    g = M.gaussian_activation(raw, scale_max=2.0)
    xyz, scale, quat, rgb, opacity = splat.split_gaussians(g)
    assert xyz.abs().max() <= 1 and (scale > 0).all() and scale.max() <= 2.0
    assert torch.allclose(quat.norm(dim=-1), torch.ones(4, 100), atol=1e-6)
    assert rgb.min() >= 0 and rgb.max() <= 1 and opacity.min() >= 0 and opacity.max() <= 1
    assert torch.allclose(scale, 2.0 * torch.sigmoid(raw[..., 3:6]))


@pytest.mark.parametrize("k", [1, 7, 64, 512])
def test_gmae_shapes_for_any_number_of_gaussians(k):
    torch.manual_seed(k)
    # loss on all pixels: with k = 1 the one Gaussian may sit on visible patches only
    model = M.GMAE(small_config(num_gaussians=k, loss_on="all"))
    out = model(torch.rand(2, 3, 16, 16), backend="torch")
    assert out["gaussians"].shape == (2, k, 14)
    assert out["pred"].shape == (2, 3, 16, 16)
    assert out["mask"].shape == (2, 16) and (out["mask"].sum(1) == 12).all()
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.decoder.queries.grad.abs().sum() > 0


def test_initial_gaussian_centres_are_spread_over_the_image():
    torch.manual_seed(0)
    model = M.GMAE(small_config(num_gaussians=256))
    g, _ = model.gaussians(torch.rand(2, 3, 16, 16))
    xy = g[..., 0:2]
    assert xy.std(dim=1).min() > 0.3  # not all at the centre
    assert (xy[..., 0] < -0.5).any() and (xy[..., 0] > 0.5).any()


def test_pixel_decoder_is_mae():
    model = M.GMAE(small_config(decoder="pixels"))
    out = model(torch.rand(3, 3, 16, 16))
    assert out["gaussians"] is None and out["pred"].shape == (3, 3, 16, 16)
    assert model.decoder.head.out_features == 4 * 4 * 3


def test_encoder_ignores_masked_patches():
    torch.manual_seed(0)
    model = M.GMAE(small_config()).eval()
    x = torch.rand(1, 3, 16, 16)
    g1 = torch.Generator().manual_seed(3)
    lat1, mask, _, _ = model.encoder(x, 0.75, g1)
    y = M.unpatchify(torch.where(mask.bool()[..., None], torch.rand(1, 16, 48), M.patchify(x, 4)), 4, 16, 16)
    lat2, mask2, _, _ = model.encoder(y, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(mask, mask2)
    assert torch.allclose(lat1, lat2, atol=1e-6)


def test_loss_ignores_visible_patches():
    imgs = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    pred = imgs.clone()
    pred_p = M.patchify(pred, 4)
    pred_p[:, 4:] = 0.0  # wrong only on visible patches
    assert M.reconstruction_loss(M.unpatchify(pred_p, 4, 16, 16), imgs, mask, 4) == 0
    pred_p = M.patchify(imgs, 4).clone()
    pred_p[:, :4] += 0.5  # wrong by 0.5 on every masked pixel
    loss = M.reconstruction_loss(M.unpatchify(pred_p, 4, 16, 16), imgs, mask, 4)
    assert loss.item() == pytest.approx(0.25)
    loss_all = M.reconstruction_loss(M.unpatchify(pred_p, 4, 16, 16), imgs, mask, 4, loss_on="all")
    assert loss_all.item() == pytest.approx(0.25 * 4 / 16)


def test_loss_gradient_reaches_only_masked_pixels():
    imgs = torch.rand(1, 3, 16, 16)
    mask = (torch.arange(16) % 2).float()[None]
    pred = torch.rand(1, 3, 16, 16, requires_grad=True)
    M.reconstruction_loss(pred, imgs, mask, 4).backward()
    per_patch = M.patchify(pred.grad, 4).abs().sum(-1)[0]
    assert (per_patch[mask[0] == 0] == 0).all() and (per_patch[mask[0] == 1] > 0).all()


def test_norm_pix_targets_are_normalised_per_patch():
    imgs = torch.rand(1, 3, 16, 16)
    target = M.patchify(imgs, 4)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = M.unpatchify(normed, 4, 16, 16)
    assert M.reconstruction_loss(pred, imgs, torch.ones(1, 16), 4, norm_pix=True) < 1e-10


def test_encoder_state_dict_uses_timm_names():
    keys = set(M.GMAE(small_config()).encoder.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.1.mlp.fc1.weight",
              "blocks.1.mlp.fc2.bias", "blocks.1.norm2.weight", "norm.weight", "norm.bias"]:
        assert k in keys, k


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 16, 16\]"):
        M.GMAE(small_config())(torch.rand(1, 3, 32, 32))


def test_mask_ratio_zero_scores_every_pixel():
    model = M.GMAE(small_config())
    out = model(torch.rand(2, 3, 16, 16), mask_ratio=0.0, backend="torch")
    assert out["mask"].sum() == 0 and torch.isfinite(out["loss"])


def test_normalize_matches_formula():
    x = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(M.IMAGENET_MEAN), torch.tensor(M.IMAGENET_STD)
    expect = (x - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.allclose(M.normalize(x), expect)
    assert torch.allclose(M.normalize(x[0]), expect[0])
    assert M.normalize(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="RGB"):
        M.normalize(torch.rand(2, 4, 4, 4))


def test_center_depth_removes_each_images_common_depth_shift_and_its_gradient():
    raw = torch.randn(3, 10, 14, dtype=torch.float64)
    shifted = raw.clone()
    shifted[..., 2] += torch.tensor([[5.0], [-3.0], [0.5]], dtype=torch.float64)  # one shift per image
    a, b = M.gaussian_activation(raw, 6.0, center_depth=True), M.gaussian_activation(shifted, 6.0, center_depth=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert a[..., 2].mean(-1).abs().max() < 0.5  # centred: tanh of raw depths with mean 0 per image
    # The paper's activation (off) moves with the shift; the centred one's gradient has no common mode.
    assert (M.gaussian_activation(shifted, 6.0)[..., 2] - M.gaussian_activation(raw, 6.0)[..., 2]).abs().max() > 0.1
    raw.requires_grad_(True)
    (grad,) = torch.autograd.grad((M.gaussian_activation(raw, 6.0, center_depth=True)[..., 2] * torch.rand(3, 10)).sum(), raw)
    torch.testing.assert_close(grad[..., 2].sum(-1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(M.gaussian_activation(raw.detach(), 6.0, center_depth=True)[..., [0, 1, *range(3, 14)]],
                               M.gaussian_activation(raw.detach(), 6.0)[..., [0, 1, *range(3, 14)]], rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 48, 64])
def test_anchor_grid_spreads_k_distinct_points_inside_the_image(k):
    a = M.anchor_grid(k)
    assert a.shape == (k, 2) and a.abs().max() < 1
    assert len({tuple(p) for p in a.tolist()}) == k
    if k == 64:  # an 8 x 8 grid of cell centres: -7/8, -5/8, ..., 7/8 in x and y, raster order
        centres = torch.arange(-7, 8, 2, dtype=torch.float64) / 8
        assert torch.equal(a[:8, 0], centres) and torch.equal(a[::8, 1], centres)


def test_anchored_queries_start_at_their_grid_points_and_carry_its_position_embedding():
    torch.manual_seed(0)
    cfg = small_config(num_gaussians=16, anchors=True)  # 16 px, patch 4: a 4 x 4 grid, one anchor per patch
    model = M.GMAE(cfg)
    g, _ = model.gaussians(torch.rand(3, 3, 16, 16))
    a = M.anchor_grid(16).float()
    assert (g[..., 0:2] - a).abs().max() < 0.15  # every centre starts near its own anchor, in every image
    # one anchor per patch: the queries' position embedding is the latents' embedding of the same patch
    assert torch.allclose(model.decoder.query_pos[0], model.decoder.decoder_pos_embed[0, 1:], atol=1e-6)
    out = model(torch.rand(2, 3, 16, 16))
    out["loss"].backward()
    assert model.decoder.queries.grad.abs().sum() > 0
    assert "decoder.query_pos" not in model.state_dict()  # fixed, rebuilt from the config: not saved


def test_sincos_embedding_of_fractional_points_interpolates_the_grid():
    a = M.sincos_embed_2d(32, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]))
    grid = M.sincos_pos_embed(32, 4, cls_token=False)[0].double()  # row 3: patches 12..15
    assert torch.allclose(a, grid[[13, 14]], atol=1e-7)
