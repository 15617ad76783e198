"""
The evaluation of zeroshot.py's readings against ground truth and controls (paper Sec. 4.3-4.4;
docs/design.md 5): edges with the BSDS boundary benchmark, figure-ground masks with IoU and F, and the
learned depth with threshold-free diagnostics. Without the controls no zero-shot number means anything.

The readings come in as a function readings(img [3, H, W], i) -> {depth mode: reading}, built by zeroshot.py
(this file never imports it) for the learned depth and its controls (zeroshot.control_depth):
    learned      the model's z
    permuted     each image's z values randomly permuted among its Gaussians
    radial       position only: z replaced by 1 - 2 r / sqrt(2), r = distance of the centre (x, y) from the image
                 centre (centre far, corners near: the centre prior some models learn instead of depth)
and the controls that need no model are added here:
    sobel        (edges) gradient magnitude of the grey image, divided by its maximum
    all/ellipse  (figure-ground) every pixel, or the centred ellipse with semi-axes 0.35 W, 0.35 H

Scores:
    edges (BSDS500, Martin et al. 2004): each soft map in [0, 1] is cut at T thresholds t_j = j / (T + 1),
        thinned and matched to each annotator's boundaries within 0.0075 of the image diagonal (pyEdgeEval's port
        of the official correspondPixels). P = matched pred / pred, R = matched gt / gt, F = 2 P R / (P + R).
        ODS: best F of the counts summed over the dataset at one threshold; OIS: each image at its own best
        threshold; AP: area under the dataset's PR curve.
    figure-ground: IoU = |pred & gt| / |pred | gt|, F = (1 + b2) P R / (b2 P + R) with b2 = 0.3 (ECSSD).
    depth, on synthetic scenes whose paint order is known (per image, then the mean):
        fg_AUC     P(nearness -z of a Gaussian centred on the foreground > that of one centred elsewhere):
                   0.5 = no information, < 0.5 = the object sits behind
        rank_corr  Spearman correlation of nearness with the paint order under each centre (later = nearer)
        scale_z    Spearman correlation of z with the mean scale (Fig. 10: larger Gaussians nearer, so < 0)
        and a row "beyond-pos": the learned z minus its per-image least-squares fit a + b r on the distance r
        from the image centre, the part of depth that position (the centre prior) cannot explain.

Try it (zeroshot.py parses the flags and hands its readings to the functions here):
    python zeroshot.py eval-edges --pred DIR --gt DIR     ODS / OIS / AP of edge PNGs against BSDS .mat boundaries
    python zeroshot.py eval-edges --split val             edges of BSDS500 val for GMAE, controls and Sobel, scored
    python zeroshot.py eval-edges --synthetic 200         the same on synthetic scenes and their boundary maps
    python zeroshot.py eval-fg [--masks DIR | --synthetic 200 [--anywhere]]   IoU, F of figure-ground vs controls
    python zeroshot.py eval-depth --synthetic 200 [--anywhere]               fg AUC and paint-order rank corr.

Needs the optional packages of requirements-eval.txt (pyedgeeval, scipy).
Shapes: N images, K Gaussians, T thresholds, H x W pixels; Gaussians [K, 14] as in splat.py.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import engine

EVAL_HINT = "pip install -r requirements-eval.txt"


def require(module, what):
    """Import an optional dependency, or raise ImportError saying what needs it and how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package '{module}': {EVAL_HINT}") from e


# ---------------------------------------------------------------------------------------------------------
# Rank statistics and mask scores


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


# ---------------------------------------------------------------------------------------------------------
# The BSDS boundary benchmark


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


def _counts_of(job):
    """boundary_counts of one (edge map uint8 [H, W], gt maps, thresholds) job; module-level, so that worker
    processes can unpickle it by name."""
    pred_u8, gts, thresholds = job
    return boundary_counts(pred_u8 / 255, gts, thresholds)


def match_all(jobs, workers=1):
    """[boundary_counts of each job] in order, jobs an iterable of (edge map uint8 [H, W], gt maps, thresholds).
    The matching is single-threaded C++ and costs about a minute an image at 99 thresholds, so with workers > 1
    the jobs run on that many spawned processes, each submitted as soon as the iterable makes it (a generator's
    model readings overlap the matching). The matcher's outlier edges are random in every process, as in the
    official code, so counts can differ by a pixel between any two runs, parallel or not."""
    if workers <= 1:
        return [_counts_of(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_counts_of, jobs))


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
    """A BSDS groundTruth .mat -> list of [H, W] uint8 boundary maps, one per annotator. ValueError naming the
    file when it is missing, cut short, or holds no groundTruth{i}.Boundaries."""
    scipy_io = require("scipy.io", "reading BSDS .mat ground truth")
    try:
        gt = scipy_io.loadmat(path)["groundTruth"]
        return [gt[0, i]["Boundaries"][0, 0] for i in range(gt.shape[1])]
    except Exception as e:  # OSError, ValueError, scipy's MatReadError, KeyError, IndexError, by the damage
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"could not read BSDS ground truth {path}: {type(e).__name__}: {reason}. Replace or delete "
                         "the file.") from None


def check_same_size(path, size, other, other_size):
    """ValueError unless the [H, W] sizes of ground truth and its image (or prediction) agree."""
    if tuple(size) != tuple(other_size):
        raise ValueError(f"{path} is {size[1]} x {size[0]} px but {other} is {other_size[1]} x {other_size[0]}: "
                         "ground truth and image must have the same size")


def load_edge_png(path):
    """An edge map PNG (white = edge) -> [H, W] uint8; data.BrokenImageError naming a broken file."""
    return np.asarray(data.load_rgb(path).convert("L"))


def score_edge_folder(pred_dir, gt_dir, nthresh, workers=1):
    """ODS / OIS / AP of every gt_dir/<stem>.mat against pred_dir/<stem>.png (uint8, white = edge)."""
    stems = sorted(f[:-4] for f in os.listdir(gt_dir) if f.endswith(".mat"))
    if not stems:
        raise FileNotFoundError(f"no .mat ground truth files in {gt_dir}")
    missing = [s for s in stems if not os.path.isfile(os.path.join(pred_dir, s + ".png"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(stems)} predictions missing in {pred_dir}, e.g. {missing[0]}.png")
    th = bsds_thresholds(nthresh)

    def jobs():
        for s in stems:
            pred_path, gt_path = os.path.join(pred_dir, s + ".png"), os.path.join(gt_dir, s + ".mat")
            pred, gts = load_edge_png(pred_path), load_bsds_boundaries(gt_path)
            for gt in gts:
                check_same_size(gt_path, gt.shape, pred_path, pred.shape)
            yield pred, gts, th

    return boundary_scores(np.stack(match_all(jobs(), workers)), th)


# ---------------------------------------------------------------------------------------------------------
# Controls that need no model, and the depth diagnostics


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


# ---------------------------------------------------------------------------------------------------------
# Datasets: (items, name) for each evaluation


def synthetic_name(anywhere):
    return "synthetic_anywhere" if anywhere else "synthetic"


def synthetic_scenes(n, size, anywhere):
    """The synthetic val scenes (data.py, the split train.py never sees) at size x size, for evaluation."""
    return data.SyntheticScenes(n, size, seed=data.VAL_SEED_OFFSET, fg_anywhere=anywhere)


def edge_items(synthetic, size, anywhere, bsds, split, limit):
    """(stem, image [3, H, W], list of gt boundary maps [H, W] uint8) triples and the dataset's name: `synthetic`
    val scenes when > 0, else the first `limit` images of BSDS500's `split` under the root `bsds`."""
    if synthetic:
        ds = synthetic_scenes(synthetic, size, anywhere)
        scenes = [ds.scene(i) for i in range(len(ds))]
        return [(f"scene{i:04d}", sc["image"], [sc["boundary"].numpy().astype(np.uint8)])
                for i, sc in enumerate(scenes)], synthetic_name(anywhere)
    img_dir, gt_dir = os.path.join(bsds, "images", split), os.path.join(bsds, "groundTruth", split)
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"no BSDS500 ground truth at {gt_dir}; "
                                "pass --bsds ROOT (with images/ and groundTruth/)")
    stems = sorted(f[:-4] for f in os.listdir(gt_dir) if f.endswith(".mat"))[:limit]
    if not stems:
        raise FileNotFoundError(f"no .mat ground truth files in {gt_dir}")
    items = []
    for s in stems:
        img_path, gt_path = os.path.join(img_dir, s + ".jpg"), os.path.join(gt_dir, s + ".mat")
        if not os.path.isfile(img_path):
            raise FileNotFoundError(f"no image for {gt_path}: expected {img_path}")
        img, gts = data.to_tensor(data.load_rgb(img_path)), load_bsds_boundaries(gt_path)  # each names a broken file
        for gt in gts:
            check_same_size(gt_path, gt.shape, img_path, img.shape[-2:])
        items.append((s, img, gts))
    return items, f"bsds_{split}"


MASK_FOLDERS = ("ground_truth_mask", "masks")  # ECSSD's own name, then the short one


def fg_items(synthetic, size, anywhere, masks, limit):
    """(image [3, H, W], gt mask [H, W] bool) pairs and the dataset's name: `synthetic` val scenes when > 0, else
    the first `limit` of masks/images/<stem>.* with masks/<mask folder>/<stem>.png, the mask folder being
    ground_truth_mask/ (as ECSSD's two archives unpack) or masks/."""
    if synthetic:
        ds = synthetic_scenes(synthetic, size, anywhere)
        return [(sc["image"], sc["mask"]) for sc in (ds.scene(i) for i in range(len(ds)))], synthetic_name(anywhere)
    img_dir = os.path.join(masks, "images")
    mask_dir = next((os.path.join(masks, d) for d in MASK_FOLDERS if os.path.isdir(os.path.join(masks, d))), None)
    if not os.path.isdir(img_dir) or mask_dir is None:
        raise FileNotFoundError(f"--masks {masks} needs images/ and a ground_truth_mask/ (or masks/) subfolder, "
                                "as ECSSD's images.zip and ground_truth_mask.zip unpack")
    paths = data.list_images(img_dir)[:limit]
    if not paths:
        raise FileNotFoundError(f"no images found under {img_dir} (looked for {', '.join(data.IMG_EXTENSIONS)})")
    items = []
    for path in paths:  # the mask at the image's path under images/, as a PNG
        mask_path = os.path.join(mask_dir, os.path.splitext(os.path.relpath(path, img_dir))[0] + ".png")
        if not os.path.isfile(mask_path):
            raise FileNotFoundError(f"no mask for {path}: expected {mask_path} (white = figure)")
        img = data.to_tensor(data.load_rgb(path))  # data.BrokenImageError names a file that cannot be decoded
        gt = torch.from_numpy(load_mask(mask_path))
        check_same_size(mask_path, gt.shape, path, img.shape[-2:])
        items.append((img, gt))
    return items, os.path.basename(os.path.normpath(masks))


def load_mask(path):
    """A figure-ground mask file -> bool [H, W]: figure where it is bright (> 127 of 255). Transparent pixels are
    background: the mask is laid on black, not on the white that images get."""
    return np.asarray(data.load_rgb(path, background=(0, 0, 0)).convert("L")) > 127


# ---------------------------------------------------------------------------------------------------------
# The eval-* commands of zeroshot.py


def add_commands(sub, common, layer_threshold):
    """The eval-* subcommands of zeroshot.py's parser: sub its subparsers, common the flags every command shares."""
    synth = argparse.ArgumentParser(add_help=False)
    synth.add_argument("--synthetic", type=int, default=0, help="evaluate on this many synthetic val scenes")
    synth.add_argument("--anywhere", action="store_true", help="synthetic foreground placed anywhere, not near the centre")
    synth.add_argument("--size", type=int, default=128, help="synthetic scene size in pixels (resized for the model)")
    synth.add_argument("--limit", type=int, default=None, help="only the first N images of a folder dataset")
    s = sub.add_parser("eval-edges", parents=[common, synth], help="ODS / OIS / AP (BSDS protocol)")
    s.add_argument("--pred", help="folder of edge PNGs to score (<stem>.png, as `edges` writes)")
    s.add_argument("--gt", help="folder of BSDS groundTruth .mat files")
    s.add_argument("--split", default="val", choices=["train", "val", "test"], help="BSDS500 split to run")
    s.add_argument("--bsds", help="BSDS500 root: ROOT/images/<split>/*.jpg, ROOT/groundTruth/<split>/*.mat "
                                  "(the official archive's BSR/BSDS500/data)")
    s.add_argument("--nthresh", type=int, default=99, help="thresholds swept (official benchmark: 99)")
    s.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes for the BSDS matching, about a minute an image each (default: one per core)")
    s.add_argument("--tiles", type=int, default=None, help="window size for edges (see edges --tiles)")
    s = sub.add_parser("eval-fg", parents=[common, synth], help="IoU, F of figure-ground masks vs controls")
    s.add_argument("--masks", help="figure-ground set: DIR/images/<stem>.jpg, DIR/ground_truth_mask/<stem>.png (ECSSD)")
    s.add_argument("--layers", type=int, default=2, help="number of layers L")
    s.add_argument("--threshold", type=float, default=layer_threshold, help="significant change of a pixel, in (0, 1)")
    sub.add_parser("eval-depth", parents=[common, synth], help="fg AUC and paint-order rank correlation of depth")


def missing_data(args):
    """The one-line message when an eval-* command is not told what to score (None when it is, or not eval-*)."""
    if args.command == "eval-depth" and args.synthetic < 1:
        return "eval-depth needs --synthetic N (N >= 1): it scores depth against the scenes' paint order"
    if args.command == "eval-edges" and bool(args.pred) != bool(args.gt):
        return "--pred and --gt go together: a folder of edge PNGs and a folder of BSDS .mat files"
    if args.command == "eval-edges" and not (args.pred or args.synthetic or args.bsds):
        return ("eval-edges needs --bsds ROOT with ROOT/images/<split>/<id>.jpg and ROOT/groundTruth/<split>/<id>.mat "
                "(BSDS500's BSR/BSDS500/data), or --synthetic N, or --pred DIR --gt DIR")
    if args.command == "eval-fg" and not (args.synthetic or args.masks):
        return ("eval-fg needs --masks DIR with DIR/images/<stem>.jpg and DIR/ground_truth_mask/<stem>.png (ECSSD as "
                "unpacked; masks/ also works; white = figure), or --synthetic N")
    return None


# ---------------------------------------------------------------------------------------------------------
# The evaluations: readings vs ground truth and controls, printed and saved as JSON


def print_table(title, rows, columns):
    print(title)
    print("  " + f"{'method':<12}" + "".join(f"{c:>10}" for c in columns))
    for name, r in rows.items():
        print("  " + f"{name:<12}" + "".join(f"{r[c]:>10.4f}" for c in columns))


def save_results(out, name, results):
    path = os.path.join(out, name)
    engine.write_whole(path, json.dumps(results, indent=1).encode())
    print(f"wrote {path}")


def eval_edge_folder(pred_dir, gt_dir, nthresh, workers=1):
    """Score a folder of edge PNGs (what `zeroshot.py edges` writes) against BSDS .mat files; print the scores."""
    scores = score_edge_folder(pred_dir, gt_dir, nthresh, workers)
    print_table(f"{pred_dir} vs {gt_dir} ({nthresh} thresholds)", {"pred": scores}, ["ODS", "OIS", "AP"])
    return scores


def score_edge_readings(items, readings, out, nthresh, workers=1):
    """items: (stem, image [3, H, W], gt boundary maps) triples; readings(img, i) -> {depth mode: soft edges
    [H, W]}. Writes OUT/<method>/<stem>.png for each reading and Sobel, then scores each method's maps with the
    BSDS protocol (match_all, on `workers` processes) -> {method: {ODS, OIS, AP}}."""
    th = bsds_thresholds(nthresh)
    methods = []

    def jobs():
        for i, (name, img, gts) in enumerate(items):
            maps = readings(img, i)
            maps["sobel"] = sobel_edges(img[None])[0]
            for m, e in maps.items():
                os.makedirs(os.path.join(out, m), exist_ok=True)
                u8 = data.to_uint8(e)
                engine.save_image(Image.fromarray(u8), os.path.join(out, m, name + ".png"))
                methods.append(m)
                yield u8, gts, th  # score exactly what was written
            print(f"\r{i + 1}/{len(items)} images read", end="", flush=True)

    counts = match_all(jobs(), workers)
    print()
    per_method = {}
    for m, c in zip(methods, counts):
        per_method.setdefault(m, []).append(c)
    return {m: boundary_scores(np.stack(c), th) for m, c in per_method.items()}


def eval_edges(items, where, readings, out, nthresh, workers=1):
    """Edge readings and Sobel on items (edge_items) scored with the BSDS protocol; OUT/scores.json."""
    results = score_edge_readings(items, readings, out, nthresh, workers)
    print_table(f"edges on {where}, {len(items)} images, {nthresh} thresholds", results, ["ODS", "OIS", "AP"])
    save_results(out, "scores.json", results)
    return results


def eval_fg(items, where, readings, out, layers, threshold):
    """Figure-ground readings(img, i) -> {depth mode: mask [H, W] bool} and the controls 'all' and 'ellipse' on
    items (fg_items), scored with mask_scores; mean IoU and F in OUT/fg_<where>.json. layers and threshold name
    the reading in the printed title."""
    scores = {}
    for i, (img, gt) in enumerate(items):
        H, W = img.shape[-2:]
        masks = readings(img, i)
        masks["all"], masks["ellipse"] = torch.ones(H, W, dtype=torch.bool), ellipse_mask(H, W)
        for m, pred in masks.items():
            scores.setdefault(m, []).append(mask_scores(pred, gt))
    results = {m: {"IoU": float(np.mean([s[0] for s in v])), "F": float(np.mean([s[1] for s in v]))}
               for m, v in scores.items()}
    print_table(f"figure-ground on {where}, {len(items)} images, L={layers}, threshold {threshold}",
                results, ["IoU", "F"])
    os.makedirs(out, exist_ok=True)
    save_results(out, f"fg_{where}.json", results)
    return results


def eval_depth(n, size, anywhere, readings, out):
    """Depth diagnostics of readings(img, i) -> {depth mode: Gaussians [K, 14]} on n synthetic val scenes, plus
    "beyond-pos" (beyond_position of the 'learned' reading); means in OUT/depth_<synthetic name>.json."""
    ds = synthetic_scenes(n, size, anywhere)
    diag = {}
    for i in range(len(ds)):
        sc = ds.scene(i)
        gs = readings(sc["image"], i)
        gs["beyond-pos"] = beyond_position(gs["learned"])
        for m, g in gs.items():
            diag.setdefault(m, []).append(depth_diagnostics(g, sc, size))
    results = {m: {"fg_AUC": float(np.nanmean([d[0] for d in v])), "rank_corr": float(np.nanmean([d[1] for d in v])),
                   "scale_z": float(np.nanmean([d[2] for d in v]))} for m, v in diag.items()}
    where = synthetic_name(anywhere)
    print_table(f"depth diagnostics on {where}, {len(ds)} scenes (fg AUC: 0.5 = none, < 0.5 = object behind)",
                results, ["fg_AUC", "rank_corr", "scale_z"])
    os.makedirs(out, exist_ok=True)
    save_results(out, f"depth_{where}.json", results)
    return results
