"""The numbers the results tables report, each checked against a value worked out by hand:
model.reconstruction_metrics (masked and full PSNR, the depth statistics) on a stand-in model whose
predictions and Gaussians are known, and zeroshot_eval's mask scores (IoU, F with beta^2 = 0.3) and AUC.

    PSNR = the mean over images of each image's 10 log10(1 / MSE) (not the PSNR of the set's pooled MSE)
    F_beta = (1 + b2) P R / (b2 P + R),  b2 = 0.3        AUC = P(score of a positive > score of a negative)

Run:  pytest -q tests/test_metrics.py
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import model as M
import zeroshot_eval as ZE

# Two 8 x 8 images of one grey level each (patch 4: 4 patches), told apart by that level.
LEVELS = (0.3, 0.6)
MASKS = ([1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])  # image 0: patches 0 and 3 masked; image 1: patch 1
MASKED_ERR = (0.1, 0.3)  # prediction - image on the masked patches, at the mask ratio
VISIBLE_ERR = 0.05  # ... on the visible patches (outside the loss region: never in the masked PSNR)
FULL_PRED = (0.4, 1.2)  # prediction at mask 0: image 1 overshoots and is clamped to 1 (error 0.4)
LOSS = (0.5, 1.0)
Z = ([-0.5, 0.0, 0.5, 0.995], [0.2, 0.4, -1.0, -0.95])  # per image, K = 4; |z| > 0.99: 0.995 and -1.0 only
SCALE = ([[0.1, 0.2, 0.3], [0.3, 0.3, 0.3], [0.1, 0.1, 0.1], [0.05, 0.05, 0.05]],
         [[0.4, 0.4, 0.4], [0.2, 0.3, 0.4], [0.9, 0.8, 0.7], [0.7, 0.7, 0.7]])


class KnownModel(nn.Module):
    """Stands in for GMAE: answers each image (recognised by its grey level) with the prediction, mask, loss and
    Gaussians above, so every metric has a value known in advance."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(patch_size=4)
        self.calls = []

    def forward(self, imgs, mask_ratio=None, backend="auto", generator=None):
        self.calls.append((mask_ratio, generator is not None, self.training))
        ids = [LEVELS.index(round(x[0, 0, 0].item(), 6)) for x in imgs]
        if mask_ratio == 0.0:
            pred = torch.stack([torch.full((3, 8, 8), FULL_PRED[i]) for i in ids])
            mask = torch.zeros(len(ids), 4)
            g = torch.zeros(len(ids), 4, 14)
            g[..., 2] = torch.tensor([Z[i] for i in ids])
            g[..., 3:6] = torch.tensor([SCALE[i] for i in ids])
        else:
            mask = torch.tensor([MASKS[i] for i in ids])
            err = torch.tensor([[MASKED_ERR[i] if m else VISIBLE_ERR for m in MASKS[i]] for i in ids])  # [b, N]
            pred = imgs + M.unpatchify(err[..., None].expand(-1, -1, 48), 4, 8, 8)
            g = None
        loss = torch.tensor(sum(LOSS[i] for i in ids) / len(ids))
        return {"loss": loss, "pred": pred, "recon": pred, "mask": mask, "gaussians": g}


def two_images():
    return torch.stack([torch.full((3, 8, 8), v) for v in LEVELS])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_masked_and_full_psnr_of_a_known_prediction(batch_size):
    net = KnownModel().train()
    m = M.reconstruction_metrics(net, two_images(), batch_size=batch_size)
    # masked: image 0 has 2 patches with squared error 0.01 (MSE 0.01), image 1 one patch with 0.09
    per_image = (10 * math.log10(1 / 0.01), 10 * math.log10(1 / 0.09))  # 20.00 and 10.46 dB
    assert m["psnr_masked"] == pytest.approx(sum(per_image) / 2, abs=1e-4)  # 15.23 dB
    assert m["psnr_masked"] > 10 * math.log10(3 / 0.11) + 0.8  # the pooled MSE (2 x 0.01 + 0.09) / 3: 14.36 dB
    # full: image 0 off by 0.1 everywhere (0.01), image 1 clamped to 1 so off by 0.4 (0.16)
    per_image = (10 * math.log10(1 / 0.01), 10 * math.log10(1 / 0.16))  # 20.00 and 7.96 dB
    assert m["psnr_full"] == pytest.approx(sum(per_image) / 2, abs=1e-4)  # 13.98 dB; pooled would be 10.71
    assert m["loss"] == pytest.approx(0.75)  # the per-image mean of the training loss
    assert net.training  # left in the mode it came in
    assert all(not training for _, _, training in net.calls)  # scored in eval mode
    assert {(r, seeded) for r, seeded, _ in net.calls} == {(None, True), (0.0, False)}  # the seeded mask, then mask 0


def test_depth_statistics_of_hand_made_gaussians():
    m = M.reconstruction_metrics(KnownModel(), two_images(), batch_size=1)
    z = np.array(Z)
    # per-image sample std (n - 1), then the mean over images: not the std of all 8 depths pooled
    std0 = math.sqrt(sum((v - np.mean(Z[0])) ** 2 for v in Z[0]) / 3)
    std1 = math.sqrt(sum((v - np.mean(Z[1])) ** 2 for v in Z[1]) / 3)
    assert m["z_std"] == pytest.approx((std0 + std1) / 2, abs=1e-6)
    assert m["z_std"] != pytest.approx(z.std(ddof=1), abs=1e-3)
    assert m["z_mean"] == pytest.approx(z.mean(), abs=1e-6)
    assert m["z_saturated"] == pytest.approx(2 / 8)  # 0.995 and -1.0, not -0.95
    # Pearson correlation over all 8 Gaussians of z and the mean of the three scales, each image's values
    # centred on that image's own means (the trend within an image), written out
    s = np.array(SCALE).mean(-1)  # [2, 4]
    zc, sc = (z - z.mean(1, keepdims=True)).ravel(), (s - s.mean(1, keepdims=True)).ravel()
    assert m["corr_scale_z"] == pytest.approx((zc * sc).sum() / math.sqrt((zc ** 2).sum() * (sc ** 2).sum()), abs=1e-6)
    zp, sp = z.ravel() - z.mean(), s.ravel() - s.mean()  # centred on the set's means instead: another number
    assert m["corr_scale_z"] != pytest.approx((zp * sp).sum() / math.sqrt((zp ** 2).sum() * (sp ** 2).sum()), abs=1e-2)
    assert m["corr_scale_z"] < -0.5  # the hand-made Gaussians are larger nearer: the paper's Fig. 10 sign


def test_masked_psnr_uses_one_seeded_mask_per_image():
    torch.manual_seed(0)
    net = M.GMAE(M.GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32,
                              dec_depth=1, dec_heads=2, decoder="pixels"))
    imgs = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = M.reconstruction_metrics(net, imgs, seed=0), M.reconstruction_metrics(net, imgs, seed=0)
    assert a == b
    assert M.reconstruction_metrics(net, imgs, seed=1)["psnr_masked"] != a["psnr_masked"]
    assert "z_std" not in a  # a pixel decoder has no Gaussians


def tiny_pixel_model(**kw):
    torch.manual_seed(0)
    return M.GMAE(M.GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32,
                               dec_depth=1, dec_heads=2, decoder="pixels", **kw))


def test_to_pixels_undoes_the_norm_pix_target():
    imgs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = M.patch_stats(M.patchify(imgs, 4))  # [2, 4, 1] each
    normed = M.unpatchify((M.patchify(imgs, 4) - mean) / std, 4, 8, 8)  # the perfect norm-pix prediction
    assert M.reconstruction_loss(normed, imgs, torch.ones(2, 4), 4, norm_pix=True) < 1e-10
    assert torch.allclose(M.to_pixels(normed, imgs, 4, True), imgs, atol=1e-5)
    assert M.to_pixels(normed, imgs, 4, False) is normed


def test_norm_pix_model_is_scored_in_pixel_space():
    net, imgs = tiny_pixel_model(norm_pix=True), torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = M.reconstruction_metrics(net, imgs)
    net.eval()
    with torch.no_grad():
        out = net(imgs, mask_ratio=0.0)
    per_image = lambda pred: sum(M.psnr(p.clamp(0, 1), x) for p, x in zip(pred, imgs)) / 4  # noqa: E731
    assert torch.allclose(out["recon"], M.to_pixels(out["pred"], imgs, 4, True))
    assert m["psnr_full"] == pytest.approx(per_image(out["recon"]), abs=1e-4)
    assert m["psnr_full"] > per_image(out["pred"]) + 1  # the normalised patches read as pixels: far lower


def test_masked_psnr_with_nothing_masked_is_the_full_psnr():
    m = M.reconstruction_metrics(tiny_pixel_model(mask_ratio=0.0), torch.rand(3, 3, 16, 16))
    assert math.isfinite(m["psnr_masked"]) and m["psnr_masked"] == pytest.approx(m["psnr_full"], abs=1e-4)


def test_f_measure_with_beta2_0_3_and_iou_by_hand():
    gt = torch.zeros(4, 5, dtype=torch.bool)
    gt[1:3, 1:4] = True  # 6 pixels
    pred = torch.zeros(4, 5, dtype=torch.bool)
    pred[2:4, 0:4] = True  # 8 pixels, 3 of them in gt (row 2, columns 1..3)
    iou, f = ZE.mask_scores(pred, gt)
    p, r = 3 / 8, 3 / 6
    assert iou == pytest.approx(3 / 11)  # union 6 + 8 - 3
    assert f == pytest.approx(1.3 * p * r / (0.3 * p + r))  # precision weighs more than recall
    assert f == pytest.approx(39 / 98, abs=1e-12)  # 0.24375 / 0.6125 (with P and R swapped: 0.4643)
    assert ZE.mask_scores(gt, gt) == (1.0, pytest.approx(1.0))
    assert ZE.mask_scores(torch.zeros_like(gt), gt) == (0.0, 0.0)  # an empty prediction scores 0
    assert ZE.mask_scores(torch.ones_like(gt), gt)[1] == pytest.approx(1.3 * 0.3 * 1 / (0.3 * 0.3 + 1))  # "all"


def test_auc_equals_the_pairwise_count_and_spearman_the_rank_correlation():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert ZE.auc(scores, positive) == pytest.approx(pairwise, abs=1e-12)
    assert ZE.auc(-scores, positive) == pytest.approx(1 - pairwise, abs=1e-12)
    b = scores + rng.normal(0, 2, 40)
    stats = pytest.importorskip("scipy.stats")
    assert ZE.spearman(scores, b) == pytest.approx(stats.spearmanr(scores, b)[0], abs=1e-12)
