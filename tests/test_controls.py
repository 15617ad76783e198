"""The zero-shot controls and the numbers of eval-fg / eval-edges / eval-depth on tiny hand-made cases whose
every score is known, run through `zeroshot.py eval-*` with a stand-in model that predicts fixed Gaussians.

    permuted  each image's own z values shuffled among its Gaussians (seeded: image i uses --seed + i)
    radial    z = 1 - sqrt(2) r,  r = |(x, y)|: the image centre far (z = 1), the corners near (z = -1)

The fg / edges scene (32 x 32, K = 2): a red blob B (std 10 px) at pixel (24, 8) and a blue Gaussian A so wide
(std 200 px) that it covers the whole image. Learned depth puts B in front: the layer map (L = 2) gives id 1
where B is opaque enough to hide A (alpha_B >= ~0.9, the pixels within sqrt(20) px of B's centre) and id 2
elsewhere, so the figure is exactly that disc. Radial depth puts A (centred at (0.9, 0.9), r = 1.27) in front
of B (r = 0.71): A hides B everywhere, the layer map is one id, the figure and the edges are empty.
A permutation of two depths either keeps them (the learned answer) or swaps them (A in front: empty).

The depth scene (32 x 32 layer ids): background 0, an occluder 1 in the lower-left quadrant, the foreground 2 in
the upper-right one; 8 Gaussians, 4 centred on the foreground (nearest in the learned depth), 2 on the
occluder, 2 on the background. Radial nearness grows with r, and the foreground's r values beat the others'
in exactly 8 of the 16 pairs: AUC 0.5.

Run:  pytest -q tests/test_controls.py
"""
import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import zeroshot as Z
import zeroshot_eval as ZE

HAS_PYEE = importlib.util.find_spec("pyEdgeEval") is not None
S = 32  # image and model size: no resize between them


def gaussian(x, y, z, std, rgb, opacity=1.0):
    """One isotropic Gaussian [14] whose footprint has about `std` px standard deviation at depth z (32 px)."""
    s = std * (z + 8) / (S / 2)  # world scale: undo the camera's fx / zc
    return torch.tensor([x, y, z, s, s, s, 1, 0, 0, 0, *rgb, opacity])


class FixedGaussians:
    """Stands in for a GMAE checkpoint: every image gets the same Gaussians [K, 14]."""

    def __init__(self, g):
        self.g = g
        self.cfg = SimpleNamespace(img_size=S, num_gaussians=g.shape[0], decoder="gaussians")

    def gaussians(self, x, mask_ratio=0.0, generator=None):
        assert x.shape[-2:] == (S, S)
        return self.g.expand(x.shape[0], -1, -1).clone(), torch.zeros(x.shape[0], 64)


def swaps(seed):
    """Whether the documented permutation (seeded `seed`) of two depths swaps them, read off control_depth."""
    g = torch.zeros(1, 2, 14)
    g[0, :, 2] = torch.tensor([0.0, 1.0])
    return Z.control_depth(g, "permuted", torch.Generator().manual_seed(seed))[0, 0, 2].item() == 1.0


# ------------------------------------------------------------------------------------------ the controls


def test_permuted_depth_moves_z_keeps_each_images_own_depths_and_is_reproducible_by_seed():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(3, 10, 14, generator=gen)
    g[..., 2] = torch.arange(30.0).view(3, 10) / 30  # every depth distinct, each image its own range
    p = Z.control_depth(g, "permuted", torch.Generator().manual_seed(5))
    for b in range(3):  # each image keeps its own set of depths: nothing mixed between images
        assert sorted(p[b, :, 2].tolist()) == sorted(g[b, :, 2].tolist())
        assert (p[b, :, 2] != g[b, :, 2]).sum() >= 5  # and they really move (a no-op would pass the line above)
    assert torch.equal(p[..., [0, 1, *range(3, 14)]], g[..., [0, 1, *range(3, 14)]])  # only z changes
    assert torch.equal(p, Z.control_depth(g, "permuted", torch.Generator().manual_seed(5)))  # same seed, same z
    assert not torch.equal(p, Z.control_depth(g, "permuted", torch.Generator().manual_seed(6)))
    assert torch.equal(Z.control_depth(g, "learned"), g)
    assert {swaps(s) for s in range(10)} == {True, False}  # a two-depth permutation is seeded, not fixed


def test_radial_depth_is_one_minus_root_two_times_the_distance_from_the_centre():
    xy = [(0.0, 0.0), (1.0, 1.0), (-1.0, 1.0), (0.6, 0.8), (-0.5, 0.0), (0.0, 0.25)]
    g = torch.zeros(1, len(xy), 14)
    g[0, :, 0:2] = torch.tensor(xy)
    g[0, :, 2] = 0.3
    r = Z.control_depth(g, "radial")[0, :, 2]
    expected = [1.0, -1.0, -1.0, 1 - math.sqrt(2), 1 - math.sqrt(2) / 2, 1 - math.sqrt(2) / 4]
    assert r.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="depth mode must be one of"):
        Z.control_depth(g, "random")


# ------------------------------------------------------------------------------------------ eval-fg


def blob_scene():
    """K = 2: B (near in learned depth) the red blob at pixel centre (24.5, 8.5), A (far) the blue wash."""
    b = gaussian(24.5 / 16 - 1, 8.5 / 16 - 1, -0.5, 10.0, (1.0, 0.0, 0.0))
    a = gaussian(0.9, 0.9, 0.5, 200.0, (0.0, 0.0, 1.0))
    return torch.stack([b, a])


def disc():
    """[S, S] bool: the pixels within sqrt(20) px of pixel (row 8, column 24), B's opaque core."""
    rows, cols = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    return (rows - 8) ** 2 + (cols - 24) ** 2 <= 20


def f_measure(pred, gt):
    inter = (pred & gt).sum().item()
    if inter == 0:
        return 0.0
    p, r = inter / pred.sum().item(), inter / gt.sum().item()
    return 1.3 * p * r / (0.3 * p + r)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eval_fg_scores_each_method_on_a_scene_with_a_known_figure(tmp_path, monkeypatch, seed):
    gt = disc()
    assert gt.sum().item() == 69  # columns dx = 0, +-1, +-2, +-3, +-4 hold 9, 9, 9, 7, 5 pixels: 9 + 2 x 30
    for i in range(2):  # two images, each the grey picture the stand-in ignores, each with the disc as its mask
        (tmp_path / "fg" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "fg" / "masks").mkdir(exist_ok=True)
        Image.new("RGB", (S, S), (128, 128, 128)).save(tmp_path / "fg" / "images" / f"{i}.png")
        Image.fromarray(gt.numpy().astype(np.uint8) * 255).save(tmp_path / "fg" / "masks" / f"{i}.png")
    monkeypatch.setattr(Z, "load_gmae", lambda path, device: (FixedGaussians(blob_scene()), {}))
    Z.main(["eval-fg", "--masks", str(tmp_path / "fg"), "--out", str(tmp_path / "out"), "--splat", "torch",
            "--layers", "2", "--threshold", "0.1", "--seed", str(seed)])
    res = json.loads((tmp_path / "out" / "fg_fg.json").read_text())
    assert set(res) == {"learned", "permuted", "radial", "all", "ellipse"}
    assert res["learned"] == {"IoU": 1.0, "F": pytest.approx(1.0)}  # the figure is exactly the disc
    assert res["radial"] == {"IoU": 0.0, "F": 0.0}  # A in front hides B: one layer id, no figure
    kept = np.mean([not swaps(seed + i) for i in range(2)])  # image i's permutation is seeded seed + i
    assert res["permuted"] == {"IoU": kept, "F": pytest.approx(kept)}
    share = 69 / (S * S)  # 'all': IoU = the figure's share of the image, precision = that share, recall 1
    assert res["all"] == {"IoU": pytest.approx(share), "F": pytest.approx(1.3 * share / (0.3 * share + 1))}
    rows, cols = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    ellipse = ((rows - 16) / (0.35 * S)) ** 2 + ((cols - 16) / (0.35 * S)) ** 2 <= 1
    iou = (ellipse & gt).sum().item() / (ellipse | gt).sum().item()
    assert 0 < iou < 0.5 and res["ellipse"] == {"IoU": pytest.approx(iou), "F": pytest.approx(f_measure(ellipse, gt))}


# ------------------------------------------------------------------------------------------ eval-edges


class Scenes:
    """Stands in for zeroshot_eval.synthetic_scenes(n, size, anywhere): n copies of one scene dict."""

    def __init__(self, n, scene):
        self.n, self.s = n, scene

    def __len__(self):
        return self.n

    def scene(self, i):
        return self.s


@pytest.mark.skipif(not HAS_PYEE, reason="optional pyedgeeval not installed (requirements-eval.txt)")
def test_eval_edges_scores_each_methods_own_edge_map(tmp_path, monkeypatch):
    from pyEdgeEval.preprocess import binary_thin

    seed = next(s for s in range(20) if swaps(s))  # a seed whose permutation swaps: A in front, no edges
    g = blob_scene()
    # The ground truth is the learned reading's own edge map cut at the first of 3 thresholds (0.25) and thinned,
    # so the learned row scores 1 at that threshold; radial and a swapping permutation draw no edge at all.
    learned = Z.soft_edges(g[None], S, S, backend="torch")[0].numpy()
    assert (learned > 0).sum() > 20  # rings around the blob, one per change threshold
    boundary = torch.from_numpy(binary_thin(np.round(learned * 255) / 255 >= 0.25))
    grey = torch.full((3, S, S), 0.5)  # Sobel of a flat image: no edge either
    monkeypatch.setattr(Z, "load_gmae", lambda path, device: (FixedGaussians(g), {}))
    scene = {"image": grey, "boundary": boundary}
    monkeypatch.setattr(ZE, "synthetic_scenes", lambda n, size, anywhere: Scenes(n, scene))
    Z.main(["eval-edges", "--synthetic", "1", "--size", str(S), "--nthresh", "3", "--out", str(tmp_path),
            "--splat", "torch", "--seed", str(seed)])
    res = json.loads((tmp_path / "synthetic" / "scores.json").read_text())
    assert set(res) == {"learned", "permuted", "radial", "sobel"}
    # the matcher adds random outlier edges, so a perfect map can lose a pixel: near 1, not exactly 1
    assert res["learned"]["ODS"] == pytest.approx(1.0, abs=0.02)
    assert res["learned"]["OIS"] == pytest.approx(1.0, abs=0.02)
    for method in ("permuted", "radial", "sobel"):
        assert res[method] == {"ODS": 0.0, "OIS": 0.0, "AP": 0.0}, method
    written = np.asarray(Image.open(tmp_path / "synthetic" / "learned" / "scene0000.png"))
    assert np.array_equal(written, np.round(learned * 255).astype(np.uint8))  # the learned map is what was scored
    assert np.asarray(Image.open(tmp_path / "synthetic" / "radial" / "scene0000.png")).max() == 0


# ------------------------------------------------------------------------------------------ eval-depth


def depth_scene():
    layers = torch.zeros(S, S, dtype=torch.long)
    layers[16:, :16] = 1  # the occluder: lower left
    layers[:16, 16:] = 2  # the foreground: upper right (rows are y, down; columns x, right)
    return {"image": torch.full((3, S, S), 0.5), "layers": layers, "mask": layers == 2}


# centre (x, y), learned z, and the layer id under the centre, u = floor((x + 1) 16), v = floor((y + 1) 16)
DEPTH_GAUSSIANS = [
    ((0.25, -0.25), -0.8, 2), ((0.75, -0.75), -0.7, 2), ((0.5, -0.125), -0.6, 2), ((0.125, -0.875), -0.5, 2),
    ((-0.5, 0.5), 0.0, 1), ((-0.25, 0.75), 0.1, 1),
    ((-0.5, -0.5), 0.6, 0), ((0.5, 0.5), 0.7, 0),
]


def depth_gaussians():
    g = torch.zeros(len(DEPTH_GAUSSIANS), 14)
    for k, ((x, y), z, _) in enumerate(DEPTH_GAUSSIANS):
        g[k, 0:3] = torch.tensor([x, y, z])
        g[k, 3:6] = 0.5 - 0.4 * z  # larger nearer (Fig. 10): scale falls strictly with z
        g[k, 6], g[k, 10:14] = 1.0, 0.5
    return g


def pairwise_auc(near, positive):
    """P(nearness of a positive > that of a negative), ties a half: the definition, pair by pair."""
    pos = [n for n, p in zip(near, positive) if p]
    neg = [n for n, p in zip(near, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 7])
def test_eval_depth_numbers_of_a_scene_with_a_known_paint_order(tmp_path, monkeypatch, seed):
    stats = pytest.importorskip("scipy.stats")
    g, sc = depth_gaussians(), depth_scene()
    paint = [layer for _, _, layer in DEPTH_GAUSSIANS]
    monkeypatch.setattr(Z, "load_gmae", lambda path, device: (FixedGaussians(g), {}))
    monkeypatch.setattr(ZE, "synthetic_scenes", lambda n, size, anywhere: Scenes(n, sc))
    Z.main(["eval-depth", "--synthetic", "2", "--size", str(S), "--out", str(tmp_path), "--seed", str(seed)])
    res = json.loads((tmp_path / "depth_synthetic.json").read_text())
    assert set(res) == {"learned", "permuted", "radial", "beyond-pos"}

    def expected(z):  # fg AUC of nearness -z, Spearman(-z, paint order), Spearman(z, mean scale)
        near = [-v for v in z]
        return (pairwise_auc(near, [p == 2 for p in paint]), stats.spearmanr(near, paint)[0],
                stats.spearmanr(z, g[:, 3:6].mean(1).tolist())[0])

    z_learned = [z for _, z, _ in DEPTH_GAUSSIANS]
    assert expected(z_learned)[0] == 1.0 and expected(z_learned)[2] == pytest.approx(-1.0)
    assert res["learned"] == pytest.approx(dict(zip(["fg_AUC", "rank_corr", "scale_z"], expected(z_learned))))
    z_radial = [1 - math.sqrt(2) * math.hypot(x, y) for (x, y), _, _ in DEPTH_GAUSSIANS]
    assert expected(z_radial)[0] == 0.5  # foreground r beats the others' in 8 of 16 pairs
    assert res["radial"] == pytest.approx(dict(zip(["fg_AUC", "rank_corr", "scale_z"], expected(z_radial))))
    permuted = [Z.control_depth(g[None], "permuted", torch.Generator().manual_seed(seed + i))[0, :, 2].tolist()
                for i in range(2)]  # image i's permutation is seeded seed + i; the file holds the mean
    per_image = [expected(z) for z in permuted]
    assert res["permuted"] == pytest.approx(dict(zip(["fg_AUC", "rank_corr", "scale_z"], np.mean(per_image, 0))))
    assert res["permuted"]["fg_AUC"] != 1.0
    r = np.hypot(g[:, 0].numpy(), g[:, 1].numpy())
    slope, intercept = np.polyfit(r, z_learned, 1)  # beyond-pos: what a + b r leaves of the learned z
    z_beyond = (np.array(z_learned) - (intercept + slope * r)).tolist()
    assert res["beyond-pos"] == pytest.approx(dict(zip(["fg_AUC", "rank_corr", "scale_z"], expected(z_beyond))),
                                              abs=1e-6)


def test_depth_diagnostics_read_the_layer_under_each_centre_column_x_row_y():
    # One Gaussian at (x, y) = (0.5, -0.5): column 24, row 8, inside the foreground; transposed it would read
    # row 24, column 8: the occluder. It is the nearest, so with u, v right fg AUC is 1.
    sc = depth_scene()
    g = depth_gaussians()
    auc, rank, _ = ZE.depth_diagnostics(g, sc, S)
    assert auc == 1.0 and rank > 0.9
    flipped = g.clone()
    flipped[:, 2] = -g[:, 2]  # the foreground farthest: AUC 0, not 1 (the sign of nearness)
    assert ZE.depth_diagnostics(flipped, sc, S)[0] == 0.0
    transposed = g.clone()
    transposed[:, 0], transposed[:, 1] = g[:, 1], g[:, 0]
    # x <-> y moves the 4 foreground centres onto the occluder and the 2 occluder centres onto the foreground
    assert ZE.depth_diagnostics(transposed, sc, S)[0] == pytest.approx(pairwise_auc(
        [-z for z in g[:, 2].tolist()], [False] * 4 + [True] * 2 + [False] * 2))
