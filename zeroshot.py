"""
Zero-shot readings of a pretrained GMAE's Gaussians: layers, figure-ground, edges, plots, PLY export, and their
evaluation against ground truth and controls (paper Sec. 4.3-4.4, Figs. 6-10; ../shared/DESIGN.md 5).

Encode the whole image (mask 0), take the K Gaussians and sort them by depth, front to back (splat.depth_order).

    layers (l@L): split the sorted Gaussians into L groups of equal count; R_0 = background (white),
        R_n = render of groups 1..n. Layer map: each pixel gets the LAST n with
            max_channel |R_n - R_{n-1}| > threshold          ("adding that layer makes a significant change")
        and 0 where no group changed it.
    figure-ground: the layer ids are split in two at the Otsu threshold (largest between-side variance of the
        ids); the figure is the side that covers LESS of the image border (no ground truth, no "near = figure":
        the paper finds large background blobs near the camera and small object Gaussians far, Sec. 4.4).
    edges: pixels whose layer id differs from the right or lower neighbour (data.boundary_map's convention).
        The soft edge map in [0, 1] is the mean of these binary maps over several L and thresholds, so the
        BSDS benchmark has levels to sweep; fewer, wider layers give coarser, cleaner edges (Fig. 8).

Any image size and aspect: the image is resized (squashed) to the model's S x S and the Gaussians are rendered
straight at the input's H x W. The camera maps x, y in [-1, 1] onto the whole image whatever its size (focal
W/2, H/2), so a render at H x W is the same picture as at S x S, only sharper. `edges --tiles WIN` instead runs
overlapping WIN x WIN windows (stride WIN/2, each resized to S x S) and blends their edge maps with a tent
weight, so a 32 px model gives a 481 x 321 edge map with local detail.

Controls (without them no zero-shot number means anything):
    --depth permuted   each image's z values randomly permuted among its Gaussians before the reading
    --depth radial     position only: z replaced by 1 - 2 r / sqrt(2), r = distance of the centre (x, y) from the
                       image centre (centre far, corners near: the centre prior some models learn instead of depth)
    sobel              (edges) gradient magnitude of the grey image, divided by its maximum
    all / ellipse      (figure-ground) every pixel, or the centred ellipse with semi-axes 0.35 W, 0.35 H

Commands (each takes image files and/or folders, JPEG or PNG, any size; writes OUT/<stem>...):
    python zeroshot.py recon  img.jpg [--mask 0.75]      input | reconstruction, PSNR printed
    python zeroshot.py layers img.jpg --layers 4         layer map, each group alone (Fig. 6), first K/8..K (Fig. 7)
    python zeroshot.py figure-ground img.jpg             <stem>.png mask (input size) and <stem>_overlay.png
    python zeroshot.py edges  img.jpg [--tiles 96]        <stem>.png soft edges, input size, white = edge
    python zeroshot.py gaussians img.jpg                  centres by depth, scale vs depth (Fig. 10), opacities
    python zeroshot.py export img.jpg                     <stem>.ply in the 3DGS layout (see write_ply)
    python zeroshot.py eval-edges --pred DIR --gt DIR     ODS / OIS / AP against BSDS .mat boundaries
    python zeroshot.py eval-edges --split val             edges of BSDS500 val for GMAE, controls and Sobel, scored
    python zeroshot.py eval-edges --synthetic 200         the same on synthetic scenes and their boundary maps
    python zeroshot.py eval-fg [--masks DIR | --synthetic 200 [--anywhere]]   IoU, F of figure-ground vs controls
    python zeroshot.py eval-depth --synthetic 200 [--anywhere]  threshold-free: fg AUC and paint-order rank corr.
        (and for "beyond-pos": z minus its per-image linear fit on the distance from the image centre)

The evaluation needs the optional packages of requirements-eval.txt (pyedgeeval, scipy, matplotlib).
Shapes: B images, K Gaussians, L layers, H x W pixels; Gaussians [B, K, 14] as in splat.py.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import engine
import data
import model as M
import splat

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")  # optional; every command also takes explicit paths
DEFAULT_CKPT = os.path.join("runs", "gmae", "checkpoint.pt")  # train.py's default --out
EDGE_LAYERS = (2, 4, 8)  # the soft edge map averages over these L ...
EDGE_THRESHOLDS = (0.05, 0.1, 0.2)  # ... and these change thresholds
DEPTH_MODES = ("learned", "permuted", "radial")
EVAL_HINT = "pip install -r requirements-eval.txt"


def require(module, what):
    """Import an optional dependency, or raise ImportError saying what needs it and how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package '{module}': {EVAL_HINT}") from e


# ---------------------------------------------------------------------------------------------------------
# Gaussians of an image, and the depth controls


@torch.no_grad()
def image_gaussians(net, imgs, mask_ratio=0.0, generator=None):
    """imgs [B, 3, H, W] in [0, 1], any H, W -> (Gaussians [B, K, 14], the model's input [B, 3, S, S]).

    The image is squashed to S x S (bilinear, antialiased); render the Gaussians at H x W to map back."""
    S = net.cfg.img_size
    x = imgs if imgs.shape[-2:] == (S, S) else F.interpolate(imgs, size=(S, S), mode="bilinear", antialias=True)
    g, _ = net.gaussians(x.clamp(0, 1), mask_ratio, generator)
    return g, x


def control_depth(g, mode, generator=None):
    """The Gaussians with their z replaced for a control: 'learned' (unchanged), 'permuted' (each image's z values
    shuffled among its Gaussians) or 'radial' (z = 1 - sqrt(2) r, r = |(x, y)|: the centre far, corners near)."""
    if mode == "learned":
        return g
    if mode not in DEPTH_MODES:
        raise ValueError(f"depth mode must be one of {DEPTH_MODES}, got {mode!r}")
    g = g.clone()
    if mode == "permuted":
        perm = torch.argsort(torch.rand(g.shape[:2], generator=generator), dim=1).to(g.device)  # [B, K]
        g[..., 2] = torch.gather(g[..., 2], 1, perm)
    else:
        g[..., 2] = 1 - math.sqrt(2) * g[..., 0:2].norm(dim=-1)
    return g


def sort_by_depth(g):
    """[B, K, 14] -> the same Gaussians front to back (ascending z, ties by index: splat.depth_order)."""
    order = splat.depth_order(g[..., 2])
    return torch.gather(g, 1, order.unsqueeze(-1).expand_as(g))


def group_bounds(K, L):
    """Boundaries of L groups of (nearly) equal count over K sorted Gaussians: group n is [b[n-1], b[n])."""
    if not 1 <= L <= K:
        raise ValueError(f"--layers must be in 1..{K} (the model's number of Gaussians), got {L}")
    return [round(K * n / L) for n in range(L + 1)]


# ---------------------------------------------------------------------------------------------------------
# Layers, figure-ground, edges (DESIGN.md 5)


@torch.no_grad()
def cumulative_renders(g, H, W, L, backend="auto"):
    """R [B, L + 1, 3, H, W]: R_0 = white background, R_n = render of the n nearest groups (of L)."""
    g = sort_by_depth(g)
    b = group_bounds(g.shape[1], L)
    renders = [torch.ones(g.shape[0], 3, H, W, dtype=g.dtype, device=g.device)]
    renders += [splat.render(g[:, : b[n]], H, W, backend=backend) for n in range(1, L + 1)]
    return torch.stack(renders, dim=1)


def layer_map(renders, threshold):
    """renders [B, L + 1, 3, H, W] -> layer ids [B, H, W] (int64): the last n whose group changed the pixel by more
    than threshold (max over channels of |R_n - R_{n-1}|), 0 where none did."""
    change = (renders[:, 1:] - renders[:, :-1]).abs().amax(dim=2)  # [B, L, H, W]
    n = torch.arange(1, change.shape[1] + 1, device=change.device).view(1, -1, 1, 1)
    return (n * (change > threshold)).amax(dim=1)


def id_edges(ids):
    """[..., H, W] integer map -> bool map, True where the id differs from the right or lower neighbour."""
    e = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    e[..., :, :-1] |= ids[..., :, :-1] != ids[..., :, 1:]
    e[..., :-1, :] |= ids[..., :-1, :] != ids[..., 1:, :]
    return e


def soft_edges(g, H, W, layers=EDGE_LAYERS, thresholds=EDGE_THRESHOLDS, backend="auto"):
    """Gaussians [B, K, 14] -> soft edge map [B, H, W] in [0, 1]: the mean over (L, threshold) of layer-map edges."""
    K = g.shape[1]
    layers = [L for L in layers if L <= K] or [K]
    acc = torch.zeros(g.shape[0], H, W)
    for L in layers:
        R = cumulative_renders(g, H, W, L, backend)
        for th in thresholds:
            acc += id_edges(layer_map(R, th)).float().cpu()
    return acc / (len(layers) * len(thresholds))


def otsu_split(ids):
    """The id t maximising the between-side variance of {ids <= t} vs {ids > t} (Otsu 1979) over one [H, W] map."""
    values, counts = torch.unique(ids, return_counts=True)
    if len(values) < 2:
        return int(values[0])
    p = counts.double() / counts.sum()
    v = values.double()
    best, best_t = -1.0, int(values[0])
    for i in range(len(values) - 1):
        w0, w1 = p[: i + 1].sum(), p[i + 1:].sum()
        m0, m1 = (p[: i + 1] * v[: i + 1]).sum() / w0, (p[i + 1:] * v[i + 1:]).sum() / w1
        score = (w0 * w1 * (m0 - m1) ** 2).item()
        if score > best:
            best, best_t = score, int(values[i])
    return best_t


def border(H, W):
    """[H, W] bool, True on the one-pixel image border."""
    b = torch.zeros(H, W, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def figure_ground(ids):
    """Layer ids [H, W] -> figure mask [H, W] bool. Split at otsu_split; the figure is the side holding fewer of
    the border pixels (ties: the far side, Sec. 4.4). One id everywhere gives an empty figure."""
    t = otsu_split(ids)
    far = ids > t
    if not far.any():
        return far
    on_border = border(*ids.shape).to(ids.device)
    far_share = (far & on_border).sum().item() / on_border.sum().item()
    return far if far_share <= 0.5 else ~far


def sobel_edges(imgs):
    """imgs [B, 3, H, W] -> gradient magnitude of the grey image [B, H, W], divided by each image's maximum."""
    grey = (0.299 * imgs[:, 0] + 0.587 * imgs[:, 1] + 0.114 * imgs[:, 2]).unsqueeze(1)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=imgs.dtype)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2, 1, 3, 3]
    gxy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)  # [B, 2, H, W]
    mag = gxy.norm(dim=1)
    return mag / mag.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)


def ellipse_mask(H, W, semi_axis=0.35):
    """The centred-ellipse prior: [H, W] bool, semi-axes semi_axis * W and semi_axis * H."""
    y = (torch.arange(H) + 0.5 - H / 2) / (semi_axis * H)
    x = (torch.arange(W) + 0.5 - W / 2) / (semi_axis * W)
    return y[:, None] ** 2 + x[None, :] ** 2 <= 1


def tent(n):
    """1-D blending weight [n] of a window: highest in the middle, small but > 0 at the ends."""
    t = (torch.arange(n) + 0.5) / n
    return 1 - (2 * t - 1).abs() + 1e-3


def window_starts(size, win):
    """Start offsets of windows of length win with stride win / 2 that cover [0, size); the last one ends at size."""
    stride = max(1, win // 2)
    starts = list(range(0, max(size - win, 0) + 1, stride))
    if starts[-1] + win < size:
        starts.append(size - win)
    return starts


def edge_map(net, img, depth="learned", tiles=None, layers=EDGE_LAYERS, thresholds=EDGE_THRESHOLDS,
             backend="auto", generator=None):
    """One image [3, H, W] -> soft edge map [H, W] in [0, 1] at the input's size.

    tiles=None: the whole image through the model (squashed to S x S), rendered at H x W.
    tiles=WIN: overlapping WIN x WIN windows (stride WIN/2), each through the model and rendered at WIN x WIN,
    blended with a tent weight."""
    H, W = img.shape[-2:]

    def one(crop):  # [3, h, w] -> [h, w]
        g, _ = image_gaussians(net, crop[None])
        g = control_depth(g, depth, generator)
        return soft_edges(g, crop.shape[-2], crop.shape[-1], layers, thresholds, backend)[0]

    if tiles is None:
        return one(img)
    win = min(tiles, H, W)
    out, weight = torch.zeros(H, W), torch.zeros(H, W)
    w2d = tent(win)[:, None] * tent(win)[None, :]
    for top in window_starts(H, win):
        for left in window_starts(W, win):
            out[top:top + win, left:left + win] += w2d * one(img[:, top:top + win, left:left + win])
            weight[top:top + win, left:left + win] += w2d
    return out / weight


# ---------------------------------------------------------------------------------------------------------
# Pictures


def to_pil(x):
    """[3, H, W] or [H, W] tensor in [0, 1] -> PIL image (RGB or greyscale)."""
    arr = (x.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr.transpose(1, 2, 0) if arr.ndim == 3 else arr)


def colour_ids(ids, L):
    """Layer ids [H, W] -> [3, H, W]: 0 black, 1..L from blue (near) through green to red (far)."""
    t = ids.float() / max(L, 1)
    rgb = torch.stack([t.clamp(0, 1), 1 - (2 * t - 1).abs(), (1 - t)], dim=0)
    return rgb * (ids > 0)


def display_size(H, W, longest=160):
    s = longest / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def strip(panels, labels):
    """A row of equally sized [3, h, w] panels with a label above each -> PIL image."""
    h, w = panels[0].shape[-2:]
    out = Image.new("RGB", (len(panels) * (w + 4), h + 14), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, (p, text) in enumerate(zip(panels, labels)):
        out.paste(to_pil(p), (i * (w + 4), 14))
        draw.text((i * (w + 4) + 2, 1), text, fill=(0, 0, 0))
    return out


def layers_strip(g, img, L, threshold, backend="auto"):
    """Paper Figs. 6-7 in one row: input | all Gaussians | layer map | each group alone | first K/8, K/4, K/2, K."""
    H, W = display_size(*img.shape[-2:])
    g = sort_by_depth(g)
    K = g.shape[1]
    b = group_bounds(K, L)
    R = cumulative_renders(g, H, W, L, backend)
    ids = layer_map(R, threshold)[0]
    panels = [F.interpolate(img[None], size=(H, W), mode="bilinear", antialias=True)[0], R[0, -1], colour_ids(ids, L)]
    labels = ["input", f"all {K}", f"layers L={L}"]
    for n in range(1, L + 1):
        panels.append(splat.render(g[:, b[n - 1]:b[n]], H, W, backend=backend)[0])
        labels.append(f"group {n}")
    for k in sorted({max(1, K >> i) for i in range(4)}):
        panels.append(splat.render(g[:, :k], H, W, backend=backend)[0])
        labels.append(f"first {k}")
    return strip(panels, labels)


def plot_gaussians(g, img, path):
    """Three plots (matplotlib): centres over the image coloured by depth, scale vs depth (Fig. 10), opacities."""
    require("matplotlib", "the gaussians command")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = g[0].cpu().numpy()
    x, y, z = g[:, 0], g[:, 1], g[:, 2]
    size = g[:, 3:6].mean(1)
    H, W = img.shape[-2:]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.8))
    ax[0].imshow(img.permute(1, 2, 0).numpy(), extent=(0, W, H, 0))
    sc = ax[0].scatter((x + 1) * W / 2, (y + 1) * H / 2, c=z, cmap="viridis", s=8, vmin=-1, vmax=1)
    fig.colorbar(sc, ax=ax[0], label="z (small = near)")
    ax[0].set_title("centres, coloured by depth")
    ax[1].scatter(z, size, s=8)
    ax[1].set_xlabel("z (small = near)")
    ax[1].set_ylabel("mean scale (world units)")
    ax[1].set_title(f"scale vs depth, Spearman {spearman(z, size):+.2f}")
    ax[2].hist(g[:, 13], bins=20, range=(0, 1))
    ax[2].set_xlabel("opacity")
    ax[2].set_title("opacity histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# PLY export (the layout of the 3DGS reference code, Kerbl et al. 2023, which splat viewers read)

SH_C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))
PLY_FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


def write_ply(path, g):
    """Write Gaussians [K, 14] as a binary little-endian PLY with the 3DGS vertex properties (float32):
        x y z        centre, in this project's world frame (x right, y down, z away from the camera, which
                     sits at z = -8 looking along +z with a 90-degree field of view: DESIGN.md 2)
        nx ny nz     0 (unused, kept for viewers that expect them)
        f_dc_0..2    (rgb - 0.5) / SH_C0, colour as a degree-0 spherical harmonic (no f_rest: degree 0 only)
        opacity      logit(opacity), opacities clamped to [1e-6, 1 - 1e-6]
        scale_0..2   log(scale), world units
        rot_0..3     unit quaternion (w, x, y, z)"""
    g = g.detach().double().cpu().numpy()
    opacity = np.clip(g[:, 13], 1e-6, 1 - 1e-6)
    cols = [g[:, 0], g[:, 1], g[:, 2], *np.zeros((3, len(g))), *((g[:, 10:13] - 0.5) / SH_C0).T,
            np.log(opacity / (1 - opacity)), *np.log(np.maximum(g[:, 3:6], 1e-12)).T, *g[:, 6:10].T]
    rows = np.stack(cols, axis=1).astype("<f4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(g)}"]
    header += [f"property float {name}" for name in PLY_FIELDS] + ["end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rows.tobytes())


def read_ply(path):
    """Read a PLY written by write_ply back into Gaussians [K, 14] (float32 values, as stored)."""
    with open(path, "rb") as f:
        lines = []
        while not lines or lines[-1] != "end_header":
            lines.append(f.readline().decode("ascii").strip())
        names = [ln.split()[-1] for ln in lines if ln.startswith("property")]
        count = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[-1])
        if tuple(names) != PLY_FIELDS:
            raise ValueError(f"{path}: expected the properties {PLY_FIELDS}, got {tuple(names)}")
        rows = np.frombuffer(f.read(4 * len(names) * count), dtype="<f4").reshape(count, len(names))
    col = {n: rows[:, i].astype(np.float64) for i, n in enumerate(names)}
    xyz = np.stack([col["x"], col["y"], col["z"]], 1)
    scale = np.exp(np.stack([col[f"scale_{i}"] for i in range(3)], 1))
    quat = np.stack([col[f"rot_{i}"] for i in range(4)], 1)
    rgb = np.stack([col[f"f_dc_{i}"] for i in range(3)], 1) * SH_C0 + 0.5
    opacity = 1 / (1 + np.exp(-col["opacity"]))
    return torch.from_numpy(np.concatenate([xyz, scale, quat, rgb, opacity[:, None]], 1)).float()


# ---------------------------------------------------------------------------------------------------------
# Scores: BSDS boundary benchmark, masks, threshold-free depth diagnostics


def average_ranks(a):
    """Ranks 1..n of a 1-D array, ties get their average rank (as scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(a, b):
    """Spearman rank correlation of two 1-D arrays; nan if either is constant."""
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def auc(scores, positive):
    """Area under the ROC curve of scores for a bool label (Mann-Whitney U / n+ n-); nan without both classes."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(np.asarray(scores))
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mask_scores(pred, gt, beta2=0.3):
    """IoU and F-measure (beta^2 = 0.3, the salient-object convention of ECSSD) of bool masks [H, W]."""
    inter, union = (pred & gt).sum().item(), (pred | gt).sum().item()
    iou = inter / union if union else 1.0
    p = inter / pred.sum().item() if pred.any() else 0.0
    r = inter / gt.sum().item() if gt.any() else 0.0
    f = (1 + beta2) * p * r / (beta2 * p + r) if p + r > 0 else 0.0
    return iou, f


def bsds_thresholds(nthresh):
    """The benchmark's thresholds: nthresh values evenly spaced in (0, 1), linspace(1/(n+1), n/(n+1), n)."""
    return np.linspace(1.0 / (nthresh + 1), 1.0 - 1.0 / (nthresh + 1), nthresh)


def boundary_counts(pred, gts, thresholds, max_dist=0.0075):
    """The BSDS matching for one image (Martin et al. 2004; official bench/evaluation_bdry_image.m), with
    pyEdgeEval's port of its C++ correspondence (bipartite matching within max_dist of the image diagonal):
    for each threshold, the thinned map pred >= t is matched to each human boundary map.
    Returns [4, T]: matched gt pixels, gt pixels (summed over annotators), matched pred pixels, pred pixels."""
    pyee = require("pyEdgeEval", "edge evaluation")
    from pyEdgeEval.preprocess import binary_thin

    out = np.zeros((4, len(thresholds)))
    previous = None
    for i, t in enumerate(thresholds):
        binary = binary_thin(pred >= t)
        if previous is not None and np.array_equal(binary, previous[0]):
            out[:, i] = previous[1]  # the same map as the last threshold: the same counts (the matching is exact)
            continue
        matched_pred = np.zeros(binary.shape, bool)
        for gt in gts:
            m_pred, m_gt, _, _ = pyee.correspond_pixels(binary, gt.astype(bool), max_dist=max_dist)
            matched_pred |= m_pred > 0
            out[0, i] += (m_gt > 0).sum()
            out[1, i] += gt.astype(bool).sum()
        out[2, i], out[3, i] = matched_pred.sum(), binary.sum()
        previous = (binary, out[:, i].copy())
    return out


def _prf(cnt_r, sum_r, cnt_p, sum_p):
    r = cnt_r / np.where(sum_r == 0, 1, sum_r)
    p = cnt_p / np.where(sum_p == 0, 1, sum_p)
    return r, p, 2 * p * r / np.where(p + r == 0, 1, p + r)


def boundary_scores(counts, thresholds):
    """ODS / OIS / AP from per-image counts [N, 4, T] (official bench/collect_eval_bdry.m):
    ODS = best F of the dataset-wide P, R at one threshold, interpolated linearly between thresholds (100 steps);
    OIS = F of the counts summed at each image's own best threshold;
    AP  = area under the dataset PR curve, precision interpolated at recall 0, 0.01, ..., 1 (0 outside)."""
    total = counts.sum(0)  # [4, T]
    R, P, _ = _prf(*total)
    best = 0.0
    for i in range(1, len(thresholds)):
        d = np.linspace(0, 1, 100)
        r, p = R[i] * d + R[i - 1] * (1 - d), P[i] * d + P[i - 1] * (1 - d)
        best = max(best, float(np.max(2 * p * r / np.where(p + r == 0, 1, p + r))))
    if len(thresholds) == 1:
        best = float(_prf(*total)[2][0])
    per_image_f = np.stack([_prf(*c)[2] for c in counts])  # [N, T]
    pick = per_image_f.argmax(1)
    ois = _prf(*counts[np.arange(len(counts)), :, pick].sum(0))[2]
    r_unique, idx = np.unique(R, return_index=True)
    ap = 0.0
    if len(r_unique) > 1:
        ap = float(np.interp(np.arange(0, 1.0001, 0.01), r_unique, P[idx], left=0.0, right=0.0).sum() * 0.01)
    return {"ODS": best, "OIS": float(ois), "AP": ap}


def load_bsds_boundaries(path):
    """A BSDS groundTruth .mat -> list of [H, W] uint8 boundary maps, one per annotator."""
    scipy_io = require("scipy.io", "reading BSDS .mat ground truth")
    gt = scipy_io.loadmat(path)["groundTruth"]
    return [gt[0, i]["Boundaries"][0, 0] for i in range(gt.shape[1])]


def score_edge_folder(pred_dir, gt_dir, nthresh, max_dist=0.0075):
    """ODS / OIS / AP of every gt_dir/<stem>.mat against pred_dir/<stem>.png (uint8, white = edge)."""
    stems = sorted(f[:-4] for f in os.listdir(gt_dir) if f.endswith(".mat"))
    if not stems:
        raise FileNotFoundError(f"no .mat ground truth files in {gt_dir}")
    missing = [s for s in stems if not os.path.isfile(os.path.join(pred_dir, s + ".png"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(stems)} predictions missing in {pred_dir}, e.g. {missing[0]}.png")
    th = bsds_thresholds(nthresh)
    counts = []
    for s in stems:
        pred = np.asarray(Image.open(os.path.join(pred_dir, s + ".png")).convert("L"), dtype=np.float64) / 255
        counts.append(boundary_counts(pred, load_bsds_boundaries(os.path.join(gt_dir, s + ".mat")), th, max_dist))
    return boundary_scores(np.stack(counts), th)


# ---------------------------------------------------------------------------------------------------------
# Commands on image files


def collect_images(paths):
    """Image files from a list of files and folders (folders: data.list_images, recursive, sorted)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = data.list_images(p)
            if not found:
                raise FileNotFoundError(f"no images found under {p} (looked for {', '.join(data.IMG_EXTENSIONS)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return files


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def run_recon(net, img, path, out, args):
    S = net.cfg.img_size
    g, x = image_gaussians(net, img[None], args.mask, torch.Generator().manual_seed(args.seed))
    recon_s = splat.render(g, S, S, backend=args.splat)
    H, W = img.shape[-2:]
    recon = splat.render(g, H, W, backend=args.splat)[0]  # the same Gaussians at the input's size
    Image.fromarray(np.concatenate([np.asarray(to_pil(img)), np.asarray(to_pil(recon))], axis=1)).save(
        os.path.join(out, stem(path) + ".png"))
    print(f"{path}: PSNR {splat.psnr(recon_s.clamp(0, 1), x):.2f} dB at the model's {S} x {S} (mask {args.mask})")


def run_layers(net, img, path, out, args):
    g, _ = image_gaussians(net, img[None])
    g = control_depth(g, args.depth, torch.Generator().manual_seed(args.seed))
    layers_strip(g, img, args.layers, args.threshold, args.splat).save(os.path.join(out, stem(path) + ".png"))


def run_figure_ground(net, img, path, out, args):
    g, _ = image_gaussians(net, img[None])
    g = control_depth(g, args.depth, torch.Generator().manual_seed(args.seed))
    H, W = img.shape[-2:]
    fg = figure_ground(layer_map(cumulative_renders(g, H, W, args.layers, args.splat), args.threshold)[0])
    to_pil(fg.float()).save(os.path.join(out, stem(path) + ".png"))
    tint = torch.tensor([1.0, 0.2, 0.2]).view(3, 1, 1)
    overlay = torch.where(fg, 0.5 * img + 0.5 * tint, 0.4 * img)
    to_pil(overlay).save(os.path.join(out, stem(path) + "_overlay.png"))


def run_edges(net, img, path, out, args):
    layers = EDGE_LAYERS if args.layers is None else (args.layers,)
    e = edge_map(net, img, args.depth, args.tiles, layers, EDGE_THRESHOLDS, args.splat,
                 torch.Generator().manual_seed(args.seed))
    to_pil(e).save(os.path.join(out, stem(path) + ".png"))


def run_gaussians(net, img, path, out, args):
    g, _ = image_gaussians(net, img[None])
    plot_gaussians(g, img, os.path.join(out, stem(path) + ".png"))


def run_export(net, img, path, out, args):
    g, _ = image_gaussians(net, img[None])
    write_ply(os.path.join(out, stem(path) + ".ply"), g[0])


IMAGE_COMMANDS = {"recon": run_recon, "layers": run_layers, "figure-ground": run_figure_ground,
                  "edges": run_edges, "gaussians": run_gaussians, "export": run_export}


def run_on_images(command, net, paths, out, args):
    """Run one image command on every file; an unreadable image is reported and skipped, the rest still run.
    Returns the number of failures."""
    failures = 0
    for path in paths:
        try:
            img = data.to_tensor(data.load_rgb(path))
        except RuntimeError as e:  # data.load_rgb names the file
            print(f"skipped: {e}", file=sys.stderr)
            failures += 1
            continue
        IMAGE_COMMANDS[command](net, img, path, out, args)
    print(f"{command}: {len(paths) - failures} of {len(paths)} images written to {out}"
          + (f", {failures} failed" if failures else ""))
    return failures


# ---------------------------------------------------------------------------------------------------------
# Evaluation commands


def synthetic_scenes(n, size, anywhere):
    """The synthetic val scenes (data.py, the split train.py never sees) at size x size, for evaluation."""
    return data.SyntheticScenes(n, size, seed=data.VAL_SEED_OFFSET, fg_anywhere=anywhere)


def print_table(title, rows, columns):
    print(title)
    print("  " + f"{'method':<12}" + "".join(f"{c:>10}" for c in columns))
    for name, r in rows.items():
        print("  " + f"{name:<12}" + "".join(f"{r[c]:>10.4f}" for c in columns))


def save_results(out, name, results):
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


def eval_edges_images(net, items, out, nthresh, tiles, backend, seed=0):
    """items: list of (stem, image [3, H, W], list of gt boundary maps). Writes OUT/<method>/<stem>.png for GMAE,
    its depth controls and Sobel, then scores each folder's maps with the BSDS protocol."""
    methods = list(DEPTH_MODES) + ["sobel"]
    th = bsds_thresholds(nthresh)
    counts = {m: [] for m in methods}
    for i, (name, img, gts) in enumerate(items):
        for m in methods:
            if m == "sobel":
                e = sobel_edges(img[None])[0]
            else:
                e = edge_map(net, img, m, tiles, backend=backend, generator=torch.Generator().manual_seed(seed + i))
            os.makedirs(os.path.join(out, m), exist_ok=True)
            pil = to_pil(e)
            pil.save(os.path.join(out, m, name + ".png"))
            pred = np.asarray(pil, dtype=np.float64) / 255  # score exactly what was written
            counts[m].append(boundary_counts(pred, gts, th))
        print(f"\r{i + 1}/{len(items)} images", end="", flush=True)
    print()
    return {m: boundary_scores(np.stack(c), th) for m, c in counts.items()}


def cmd_eval_edges(net, args, parser):
    if args.pred or args.gt:
        if not (args.pred and args.gt):
            parser.error("--pred and --gt go together: a folder of edge PNGs and a folder of BSDS .mat files")
        scores = score_edge_folder(args.pred, args.gt, args.nthresh)
        print_table(f"{args.pred} vs {args.gt} ({args.nthresh} thresholds)", {"pred": scores}, ["ODS", "OIS", "AP"])
        return scores
    if net is None:
        parser.error("give --pred DIR --gt DIR, or --split / --synthetic with a checkpoint")
    if args.synthetic:
        ds = synthetic_scenes(args.synthetic, args.size, args.anywhere)
        items = []
        for i in range(len(ds)):
            sc = ds.scene(i)
            items.append((f"scene{i:04d}", sc["image"], [sc["boundary"].numpy().astype(np.uint8)]))
        where = f"synthetic{'_anywhere' if args.anywhere else ''}"
    else:
        root = args.bsds
        img_dir, gt_dir = os.path.join(root, "images", args.split), os.path.join(root, "groundTruth", args.split)
        if not os.path.isdir(gt_dir):
            parser.error(f"no BSDS500 ground truth at {gt_dir}; pass --bsds ROOT (with images/ and groundTruth/)")
        stems = sorted(f[:-4] for f in os.listdir(gt_dir) if f.endswith(".mat"))[: args.limit]
        items = [(s, data.to_tensor(data.load_rgb(os.path.join(img_dir, s + ".jpg"))),
                  load_bsds_boundaries(os.path.join(gt_dir, s + ".mat"))) for s in stems]
        where = f"bsds_{args.split}"
    out = os.path.join(args.out, where + (f"_tiles{args.tiles}" if args.tiles else ""))
    results = eval_edges_images(net, items, out, args.nthresh, args.tiles, args.splat, args.seed)
    print_table(f"edges on {where}, {len(items)} images, {args.nthresh} thresholds", results, ["ODS", "OIS", "AP"])
    save_results(out, "scores.json", results)
    return results


def fg_items(args, parser):
    """(image [3, H, W], gt mask [H, W] bool) pairs: synthetic scenes, or DIR/images/<stem>.* with DIR/masks/<stem>.png."""
    if args.synthetic:
        ds = synthetic_scenes(args.synthetic, args.size, args.anywhere)
        return [(sc["image"], sc["mask"]) for sc in (ds.scene(i) for i in range(len(ds)))]
    img_dir, mask_dir = os.path.join(args.masks, "images"), os.path.join(args.masks, "masks")
    if not os.path.isdir(img_dir) or not os.path.isdir(mask_dir):
        parser.error(f"--masks {args.masks} needs images/ and masks/ subfolders (ECSSD layout)")
    items = []
    for path in data.list_images(img_dir)[: args.limit]:
        mask_path = os.path.join(mask_dir, stem(path) + ".png")
        gt = torch.from_numpy(np.asarray(data.load_rgb(mask_path).convert("L")) > 127)
        items.append((data.to_tensor(data.load_rgb(path)), gt))
    return items


def cmd_eval_fg(net, args, parser):
    items = fg_items(args, parser)
    methods = list(DEPTH_MODES) + ["all", "ellipse"]
    scores = {m: [] for m in methods}
    for i, (img, gt) in enumerate(items):
        H, W = img.shape[-2:]
        g, _ = image_gaussians(net, img[None])
        for m in methods:
            if m == "all":
                pred = torch.ones(H, W, dtype=torch.bool)
            elif m == "ellipse":
                pred = ellipse_mask(H, W)
            else:
                gm = control_depth(g, m, torch.Generator().manual_seed(args.seed + i))
                pred = figure_ground(layer_map(cumulative_renders(gm, H, W, args.layers, args.splat), args.threshold)[0])
            scores[m].append(mask_scores(pred, gt))
    results = {m: {"IoU": float(np.mean([s[0] for s in v])), "F": float(np.mean([s[1] for s in v]))}
               for m, v in scores.items()}
    where = f"synthetic{'_anywhere' if args.anywhere else ''}" if args.synthetic else os.path.basename(os.path.normpath(args.masks))
    print_table(f"figure-ground on {where}, {len(items)} images, L={args.layers}, threshold {args.threshold}",
                results, ["IoU", "F"])
    os.makedirs(args.out, exist_ok=True)
    save_results(args.out, f"fg_{where}.json", results)
    return results


def depth_diagnostics(g, scene, size):
    """Per image, threshold-free (one [K, 14] set of Gaussians and its synthetic scene):
    AUC with which nearness (-z) ranks the Gaussians centred on the foreground above the rest (0.5 = no
    information, < 0.5 = the object sits behind), and the Spearman correlation of nearness with the true paint
    order (the layer id under each centre; higher = painted later = nearer). Also the Spearman correlation of z with
    the mean scale (paper Fig. 10: larger Gaussians nearer, so negative)."""
    u = ((g[:, 0] + 1) * size / 2).long().clamp(0, size - 1)
    v = ((g[:, 1] + 1) * size / 2).long().clamp(0, size - 1)
    paint = scene["layers"][v, u].numpy()
    fg_id = scene["layers"][scene["mask"]].max().item() if scene["mask"].any() else -1
    near = -g[:, 2].numpy()
    return auc(near, paint == fg_id), spearman(near, paint), spearman(g[:, 2].numpy(), g[:, 3:6].mean(1).numpy())


def beyond_position(g):
    """[K, 14] -> the same Gaussians with z replaced by its residual after a least-squares fit z ~ a + b r, r the
    centre's distance from the image centre: the part of depth that position (the centre prior) cannot explain."""
    r = g[:, 0:2].norm(dim=-1).double()
    A = torch.stack([torch.ones_like(r), r], dim=1)  # [K, 2]
    z = g[:, 2].double()
    coef = torch.linalg.lstsq(A, z[:, None]).solution  # [2, 1]
    out = g.clone()
    out[:, 2] = (z - (A @ coef)[:, 0]).to(g.dtype)
    return out


def cmd_eval_depth(net, args, parser):
    ds = synthetic_scenes(args.synthetic, args.size, args.anywhere)
    diag = {m: [] for m in DEPTH_MODES + ("beyond-pos",)}
    for i in range(len(ds)):
        sc = ds.scene(i)
        g, _ = image_gaussians(net, sc["image"][None])
        for m in DEPTH_MODES:
            gm = control_depth(g, m, torch.Generator().manual_seed(args.seed + i))[0]
            diag[m].append(depth_diagnostics(gm, sc, args.size))
        diag["beyond-pos"].append(depth_diagnostics(beyond_position(g[0]), sc, args.size))
    results = {m: {"fg_AUC": float(np.nanmean([d[0] for d in v])), "rank_corr": float(np.nanmean([d[1] for d in v])),
                   "scale_z": float(np.nanmean([d[2] for d in v]))} for m, v in diag.items()}
    where = f"synthetic{'_anywhere' if args.anywhere else ''}"
    print_table(f"depth diagnostics on {where}, {len(ds)} scenes (fg AUC: 0.5 = none, < 0.5 = object behind)",
                results, ["fg_AUC", "rank_corr", "scale_z"])
    os.makedirs(args.out, exist_ok=True)
    save_results(args.out, f"depth_{where}.json", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint written by train.py")
    common.add_argument("--out", default=None, help="output folder (default runs/zeroshot/<command>)")
    common.add_argument("--splat", default="auto", choices=splat.BACKENDS, help="rasterizer backend")
    common.add_argument("--seed", type=int, default=0, help="seed of masks and of the permuted-depth control")
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--depth", default="learned", choices=DEPTH_MODES,
                         help="learned z, or a control: permuted z, or radial (position only)")
    reading.add_argument("--threshold", type=float, default=0.1, help="significant change of a pixel (DESIGN.md 5)")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("recon", parents=[common], help="input | reconstruction, PSNR")
    s.add_argument("--mask", type=float, default=0.0, help="mask ratio (0 = the whole image)")
    s = sub.add_parser("layers", parents=[common, reading], help="layer map, groups, first-k strip (Figs. 6-7)")
    s.add_argument("--layers", type=int, default=4, help="number of layers L")
    s = sub.add_parser("figure-ground", parents=[common, reading], help="figure mask and overlay")
    s.add_argument("--layers", type=int, default=2, help="number of layers L")
    s = sub.add_parser("edges", parents=[common, reading], help="soft edge map at the input's size")
    s.add_argument("--layers", type=int, default=None, help=f"one L (Fig. 8 hierarchy); default: mean over {EDGE_LAYERS}")
    s.add_argument("--tiles", type=int, default=None, help="window size in input pixels (stride half): local detail")
    sub.add_parser("gaussians", parents=[common], help="plots of centres, scale vs depth, opacity (matplotlib)")
    sub.add_parser("export", parents=[common], help="3DGS .ply of each image's Gaussians")
    for name in IMAGE_COMMANDS:
        sub.choices[name].add_argument("images", nargs="+", help="image files and/or folders")

    synth = argparse.ArgumentParser(add_help=False)
    synth.add_argument("--synthetic", type=int, default=0, help="evaluate on this many synthetic val scenes")
    synth.add_argument("--anywhere", action="store_true", help="synthetic foreground placed anywhere, not near the centre")
    synth.add_argument("--size", type=int, default=128, help="synthetic scene size in pixels (resized for the model)")
    synth.add_argument("--limit", type=int, default=None, help="only the first N images of a folder dataset")
    s = sub.add_parser("eval-edges", parents=[common, synth], help="ODS / OIS / AP (BSDS protocol)")
    s.add_argument("--pred", help="folder of edge PNGs to score")
    s.add_argument("--gt", help="folder of BSDS groundTruth .mat files")
    s.add_argument("--split", default="val", choices=["train", "val", "test"], help="BSDS500 split to run")
    s.add_argument("--bsds", default=os.path.join(SHARED_DATA, "bsds500"), help="BSDS500 root")
    s.add_argument("--nthresh", type=int, default=99, help="thresholds swept (official benchmark: 99)")
    s.add_argument("--tiles", type=int, default=None, help="window size for edges (see edges --tiles)")
    s = sub.add_parser("eval-fg", parents=[common, synth], help="IoU, F of figure-ground masks vs controls")
    s.add_argument("--masks", default=os.path.join(SHARED_DATA, "ecssd_fg"), help="folder with images/ and masks/")
    s.add_argument("--layers", type=int, default=2, help="number of layers L")
    s.add_argument("--threshold", type=float, default=0.1, help="significant change of a pixel")
    sub.add_parser("eval-depth", parents=[common, synth], help="fg AUC and paint-order rank correlation of depth")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", "zeroshot", args.command)
    if getattr(args, "layers", None) is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if getattr(args, "tiles", None) is not None and args.tiles < 2:
        parser.error(f"--tiles is a window size in pixels, >= 2, got {args.tiles}")
    if getattr(args, "nthresh", 1) < 1:
        parser.error(f"--nthresh must be >= 1, got {args.nthresh}")
    if args.command == "eval-depth" and args.synthetic < 1:
        parser.error("eval-depth needs --synthetic N (N >= 1): it scores depth against the scenes' paint order")

    net = None
    if not (args.command == "eval-edges" and (args.pred or args.gt)):
        try:
            net, _ = engine.load_checkpoint(args.ckpt)
        except (FileNotFoundError, ValueError) as e:  # missing, or engine.CheckpointError (a ValueError)
            parser.error(str(e))
        if net.cfg.decoder != "gaussians":
            parser.error(f"{args.ckpt} is a pixel-decoder (MAE) checkpoint; zero-shot readings need GMAE's Gaussians")
        net.eval()
        if getattr(args, "layers", None) is not None and args.layers > net.cfg.num_gaussians:
            parser.error(f"--layers {args.layers} is more than the model's {net.cfg.num_gaussians} Gaussians")
    os.makedirs(args.out, exist_ok=True)

    try:
        if args.command in IMAGE_COMMANDS:
            try:
                paths = collect_images(args.images)
            except FileNotFoundError as e:
                parser.error(str(e))
            return 1 if run_on_images(args.command, net, paths, args.out, args) else 0
        if args.command == "eval-edges":
            cmd_eval_edges(net, args, parser)
        elif args.command == "eval-fg":
            cmd_eval_fg(net, args, parser)
        else:
            cmd_eval_depth(net, args, parser)
    except (ImportError, FileNotFoundError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
