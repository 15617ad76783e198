"""
Zero-shot readings of a pretrained GMAE's Gaussians: layers, figure-ground, edges, plots and PLY export (paper
Sec. 4.3-4.4, Figs. 6-10; docs/design.md 5). Their evaluation against ground truth and controls is in
zeroshot_eval.py; its commands (eval-*) run from here.

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

Any image size and aspect: the image is squashed to the model's S x S and the Gaussians rendered at the working
size, H x W with the longest side brought down to --max-size (default 512; 0 = no bound), then maps are resized
back to H x W. The camera maps x, y in [-1, 1] onto the whole image whatever its size, so a render at H x W is the
picture at S x S, only sharper. `edges --tiles WIN` runs overlapping WIN x WIN windows of the working image
(stride WIN/2) instead and blends their edge maps with a tent weight: local detail from a 32 px model.

Depth controls (--depth; zeroshot_eval.py scores the readings against them): permuted (each image's z values
shuffled among its Gaussians) and radial (z from the centre's distance to the image centre: position only).

Commands (image files and/or folders of any size; each writes OUT/<name> plus a suffix of its own, <name> being
the file's path under the folder given, without the extension; `python zeroshot.py -h` lists them all):
    python zeroshot.py recon  img.jpg [--mask 0.75]      <name>_recon.png: input | reconstruction, PSNR printed
    python zeroshot.py layers img.jpg --layers 4         <name>_layers.png: layer map, groups (Fig. 6), first k (Fig. 7)
    python zeroshot.py figure-ground img.jpg             <name>_fg.png mask (input size), <name>_fg_overlay.png
    python zeroshot.py edges  img.jpg [--tiles 96]        <name>.png soft edges, input size, white = edge (BSDS layout)
    python zeroshot.py gaussians img.jpg                  <name>_gaussians.png: centres, scale vs depth (Fig. 10)
    python zeroshot.py export img.jpg                     <name>.ply + <name>_cameras.json: a 3DGS scene (ply.py)
    python zeroshot.py eval-edges | eval-fg | eval-depth  scored against ground truth and controls (zeroshot_eval.py)

The evaluation and plots need the optional packages of requirements-eval.txt (pyedgeeval, scipy, matplotlib).
Shapes: B images, K Gaussians, L layers, H x W pixels; Gaussians [B, K, 14] as in splat.py.
"""
import argparse
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import engine
import splat
import zeroshot_eval
from model import check_mask_ratio, psnr, to_pixels
from ply import write_cameras, write_ply

DEFAULT_CKPT = os.path.join("runs", "gmae", "checkpoint.pt")  # train.py's default --out
EDGE_LAYERS = (2, 4, 8)  # the soft edge map averages over these L ...
EDGE_THRESHOLDS = (0.05, 0.1, 0.2)  # ... and these change thresholds
LAYER_THRESHOLD = 0.1  # layers and figure-ground: a significant change of a pixel (docs/design.md 5)
MAX_SIZE = 512  # longest side the readings render at (--max-size): bounded memory whatever the photo
DEPTH_MODES = ("learned", "permuted", "radial")
IMAGE_COMMANDS = ("recon", "layers", "figure-ground", "edges", "gaussians", "export")
OUTPUT_SUFFIXES = {"recon": ("_recon.png",), "layers": ("_layers.png",), "figure-ground": ("_fg.png", "_fg_overlay.png"),
                   "edges": (".png",), "gaussians": ("_gaussians.png",), "export": (".ply", "_cameras.json")}


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


def working_size(H, W, max_size):
    """(h, w) the readings render at: H x W with the longest side brought down to max_size, aspect kept;
    H x W itself when it fits or max_size is None or 0 (no bound)."""
    if not max_size or max(H, W) <= max_size:
        return H, W
    s = max_size / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def shrink(img, max_size):
    """[3, H, W] -> the image at working_size (bilinear, antialiased); the same tensor when it fits."""
    h, w = working_size(*img.shape[-2:], max_size)
    if (h, w) == tuple(img.shape[-2:]):
        return img
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True)[0]


def resize_map(x, H, W, mode):
    """[..., h, w] map -> [..., H, W]: 'bilinear' for soft maps and pictures, 'nearest-exact' for masks (a bool
    map stays bool). The same tensor when the size is already H x W."""
    if tuple(x.shape[-2:]) == (H, W):
        return x
    y = F.interpolate(x.reshape(1, -1, *x.shape[-2:]).float(), size=(H, W), mode=mode)
    y = y.reshape(*x.shape[:-2], H, W)
    return y > 0.5 if x.dtype == torch.bool else y


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
# Layers, figure-ground, edges (docs/design.md 5)


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


def soft_edges(g, H, W, layers=EDGE_LAYERS, thresholds=EDGE_THRESHOLDS, backend="auto"):
    """Gaussians [B, K, 14] -> soft edge map [B, H, W] in [0, 1]: the mean over (L, threshold) of layer-map edges."""
    K = g.shape[1]
    layers = [L for L in layers if L <= K] or [K]
    acc = torch.zeros(g.shape[0], H, W)
    for L in layers:
        R = cumulative_renders(g, H, W, L, backend)
        for th in thresholds:
            acc += data.boundary_map(layer_map(R, th)).float().cpu()
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


def figure_ground(ids):
    """Layer ids [H, W] -> figure mask [H, W] bool. Split at otsu_split; the figure is the side holding fewer of
    the border pixels (ties: the far side, Sec. 4.4). One id everywhere gives an empty figure."""
    t = otsu_split(ids)
    far = ids > t
    if not far.any():
        return far
    on_border = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    on_border[1:-1, 1:-1] = False  # the one-pixel image border
    far_share = (far & on_border).sum().item() / on_border.sum().item()
    return far if far_share <= 0.5 else ~far



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
             backend="auto", generator=None, max_size=None):
    """One image [3, H, W] -> soft edge map [H, W] in [0, 1] (on the CPU) at the input's size.

    The map is made on the working image (shrink: longest side <= max_size) and resized back (bilinear).
    tiles=None: the whole working image through the model (squashed to S x S), rendered at its size.
    tiles=WIN: overlapping WIN x WIN windows of it (stride WIN/2), each through the model and rendered at
    WIN x WIN, blended with a tent weight."""
    H, W = img.shape[-2:]
    work = shrink(img, max_size)
    h, w = work.shape[-2:]

    def one(crop):  # [3, h, w] -> [h, w]
        g, _ = image_gaussians(net, crop[None])
        g = control_depth(g, depth, generator)
        return soft_edges(g, crop.shape[-2], crop.shape[-1], layers, thresholds, backend)[0]

    if tiles is None:
        return resize_map(one(work), H, W, "bilinear")
    win = min(tiles, h, w)
    windows = [(top, left) for top in window_starts(h, win) for left in window_starts(w, win)]
    if len(windows) > MAX_WINDOWS:  # each one is a pass of the model: --tiles 2 on a photo would take hours
        raise ValueError(f"--tiles {tiles} cuts the {w} x {h} working image into {len(windows)} windows, more than "
                         f"{MAX_WINDOWS}; use --tiles {min_tiles(h, w)} or more, or a smaller --max-size")
    out, weight = torch.zeros(h, w), torch.zeros(h, w)
    w2d = tent(win)[:, None] * tent(win)[None, :]
    for top, left in tqdm(windows, desc="windows", leave=False, disable=len(windows) < 16):
        out[top:top + win, left:left + win] += w2d * one(work[:, top:top + win, left:left + win])
        weight[top:top + win, left:left + win] += w2d
    return resize_map(out / weight, H, W, "bilinear")


MAX_WINDOWS = 1024


def min_tiles(h, w):
    """The smallest --tiles whose windows of an h x w image number at most MAX_WINDOWS."""
    return next(t for t in range(2, max(h, w) + 1)
                if len(window_starts(h, min(t, h, w))) * len(window_starts(w, min(t, h, w))) <= MAX_WINDOWS)


def figure_ground_of(g, H, W, layers, threshold, backend="auto", max_size=None):
    """Gaussians [1, K, 14] -> figure mask [H, W] bool: figure_ground of the layer map of L = layers, rendered at
    working_size(H, W, max_size) and resized back (nearest)."""
    h, w = working_size(H, W, max_size)
    fg = figure_ground(layer_map(cumulative_renders(g, h, w, layers, backend), threshold)[0])
    return resize_map(fg, H, W, "nearest-exact")


def gaussian_readings(net, read, seed, device="cpu"):
    """For zeroshot_eval: (img [3, H, W], i) -> {depth mode: read(Gaussians [1, K, 14] under that mode, H, W)}
    on the CPU, the image encoded once on device, image i's permuted control seeded seed + i."""
    def readings(img, i):
        g, _ = image_gaussians(net, img[None].to(device))
        H, W = img.shape[-2:]
        return {m: read(control_depth(g, m, torch.Generator().manual_seed(seed + i)), H, W).cpu()
                for m in DEPTH_MODES}
    return readings


def edge_readings(net, tiles, backend, seed, max_size=None, device="cpu"):
    """For zeroshot_eval: (img [3, H, W], i) -> {depth mode: edge_map [H, W]} read on device, image i's control
    seeded seed + i."""
    def readings(img, i):
        return {m: edge_map(net, img.to(device), m, tiles, backend=backend, max_size=max_size,
                            generator=torch.Generator().manual_seed(seed + i)) for m in DEPTH_MODES}
    return readings


# ---------------------------------------------------------------------------------------------------------
# Pictures


def save_png(x, path):
    """[3, H, W] or [H, W] tensor in [0, 1] -> an RGB or greyscale PNG file."""
    engine.save_image(Image.fromarray(data.to_uint8(x)), path)


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
        out.paste(Image.fromarray(data.to_uint8(p)), (i * (w + 4), 14))
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
    zeroshot_eval.require("matplotlib", "the gaussians command")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = g[0].cpu().numpy()
    x, y, z = g[:, 0], g[:, 1], g[:, 2]
    size = g[:, 3:6].mean(1)
    H, W = img.shape[-2:]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.8))
    ax[0].imshow(img.permute(1, 2, 0).cpu().numpy(), extent=(0, W, H, 0))
    sc = ax[0].scatter((x + 1) * W / 2, (y + 1) * H / 2, c=z, cmap="viridis", s=8, vmin=-1, vmax=1)
    fig.colorbar(sc, ax=ax[0], label="z (small = near)")
    ax[0].set_title("centres, coloured by depth")
    ax[1].scatter(z, size, s=8)
    ax[1].set_xlabel("z (small = near)")
    ax[1].set_ylabel("mean scale (world units)")
    ax[1].set_title(f"scale vs depth, Spearman {zeroshot_eval.spearman(z, size):+.2f}")
    ax[2].hist(g[:, 13], bins=20, range=(0, 1))
    ax[2].set_xlabel("opacity")
    ax[2].set_title("opacity histogram")
    fig.tight_layout()
    engine.write_whole(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Commands on image files: each writes OUT/<name> plus a suffix of its own, so commands can share --out


def load_gmae(path, device="cpu"):
    """(The model of a train.py checkpoint on device, in eval mode; the checkpoint dict), as engine.load_checkpoint.
    Raises FileNotFoundError; engine.CheckpointError (a ValueError) for a file that cannot be used, one whose
    weights do not fit its config, or a finetune.py classifier (no decoder); ValueError for a pixel-decoder (MAE)
    checkpoint: neither predicts Gaussians to read."""
    net, ckpt = engine.load_checkpoint(path, device)
    if net.cfg.decoder != "gaussians":
        raise ValueError(f"{path} is a pixel-decoder (MAE) checkpoint; zero-shot readings need GMAE's Gaussians")
    return net.eval(), ckpt


def pretraining_note(ckpt, path):
    """The start-up line on what a checkpoint was pretrained on, for readings of photos; None when it says a
    folder of images. train.py records its --data as ckpt["data"]: "synthetic" or the folder's path."""
    if ckpt.get("data") == "synthetic":
        return (f"note: {path} was pretrained on the embedded synthetic scenes, so on photos its readings are the "
                "outlines of that model's blobs; pretrain on photos for them (README, zero-shot readings)")
    if "data" not in ckpt:
        return (f"note: {path} does not record its pretraining data; readings of photos mean something only for "
                "a model pretrained on photos (train.py --data FOLDER)")
    return None


def run_recon(net, img, path, dest, mask_ratio, seed, backend, max_size):
    S = net.cfg.img_size
    g, x = image_gaussians(net, img[None], mask_ratio, torch.Generator(img.device).manual_seed(seed))
    recon_s = to_pixels(splat.render(g, S, S, backend=backend), x, net.cfg.patch_size, net.cfg.norm_pix)
    H, W = img.shape[-2:]
    if net.cfg.norm_pix:  # it renders normalised patches, which only map back at the model's size (to_pixels)
        recon = recon_s[0].clamp(0, 1)
    else:
        recon = splat.render(g, *working_size(H, W, max_size), backend=backend)[0]  # the same Gaussians, sharper
    recon = resize_map(recon, H, W, "bilinear")
    save_png(torch.cat([img.cpu(), recon.cpu()], dim=-1), dest + "_recon.png")  # input | reconstruction
    print(f"{path}: PSNR {psnr(recon_s.clamp(0, 1), x):.2f} dB at the model's {S} x {S} (mask {mask_ratio})")


def run_layers(net, img, dest, depth, layers, threshold, seed, backend):
    g = control_depth(image_gaussians(net, img[None])[0], depth, torch.Generator().manual_seed(seed))
    engine.save_image(layers_strip(g, img, layers, threshold, backend), dest + "_layers.png")


def run_figure_ground(net, img, dest, depth, layers, threshold, seed, backend, max_size):
    g, _ = image_gaussians(net, img[None])
    g = control_depth(g, depth, torch.Generator().manual_seed(seed))
    fg = figure_ground_of(g, *img.shape[-2:], layers, threshold, backend, max_size)
    save_png(fg.float(), dest + "_fg.png")
    flag_blank(fg, dest + "_fg.png", "all one side: the layers did not split")
    tint = torch.tensor([1.0, 0.2, 0.2], device=img.device).view(3, 1, 1)
    save_png(torch.where(fg, 0.5 * img + 0.5 * tint, 0.4 * img), dest + "_fg_overlay.png")


def run_edges(net, img, dest, depth, layers, thresholds, tiles, seed, backend, max_size):
    """Writes <name>.png, no suffix: the BSDS layout that `eval-edges --pred` reads."""
    e = edge_map(net, img, depth, tiles, layers, thresholds, backend, torch.Generator().manual_seed(seed), max_size)
    save_png(e, dest + ".png")
    flag_blank(e, dest + ".png", "no edge: the layer map is one layer everywhere")


def flag_blank(result, path, why):  # a map that is the same everywhere carries no reading: say so
    if result.numel() and bool((result == result.flatten()[0]).all()):
        print(f"note: {path} is blank ({why})", file=sys.stderr)


def run_gaussians(net, img, dest):
    g, _ = image_gaussians(net, img[None])
    plot_gaussians(g, img, dest + "_gaussians.png")


def run_export(net, img, dest):  # the scene a pinhole draws as the project does (splat.to_pinhole), and its camera
    g, _ = image_gaussians(net, img[None])
    scene, camera = splat.to_pinhole(g[0], *img.shape[-2:])
    write_ply(dest + ".ply", scene)
    write_cameras(dest + "_cameras.json", os.path.basename(dest), camera)


def run_on_images(command, files, out, write, device="cpu"):
    """write(img [3, H, W] on device, path, dest) for every (path, name) of engine.collect_images, dest = OUT/<name> (its
    folder made); an unreadable image is reported and skipped, the rest still run. Returns the number of failures."""
    failures = 0
    for path, name in files:
        try:
            img = data.to_tensor(data.load_rgb(path))
        except data.BrokenImageError as e:  # data.load_rgb names the file
            print(f"skipped: {e}", file=sys.stderr)
            failures += 1
            continue
        dest = os.path.join(out, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        write(img.to(device), path, dest)
    print(f"{command}: {len(files) - failures} of {len(files)} images written to {out}"
          + (f", {failures} failed" if failures else ""))
    return failures


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint written by train.py")
    common.add_argument("--out", default=None, help="output folder (default runs/zeroshot/<command>)")
    common.add_argument("--splat", default="auto", choices=splat.BACKENDS, help="rasterizer backend")
    common.add_argument("--seed", type=int, default=0, help="seed of masks and of the permuted-depth control")
    common.add_argument("--device", default=engine.default_device(),
                        help="cpu, cuda or cuda:N: where the model and the renders run (default: cuda when available)")
    common.add_argument("--max-size", type=int, default=MAX_SIZE,
                        help="longest side in pixels the readings render at; maps are resized back to the input's "
                             "size (0: no bound, the input's own size)")
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--depth", default="learned", choices=DEPTH_MODES,
                         help="learned z, or a control: permuted z, or radial (position only)")
    reading.add_argument("--threshold", type=float, default=None,
                         help=f"significant pixel change, in (0, 1) (docs/design.md 5; default {LAYER_THRESHOLD}; "
                              f"edges: one threshold instead of the mean over {EDGE_THRESHOLDS})")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("recon", parents=[common], help="<name>_recon.png: input | reconstruction, PSNR")
    s.add_argument("--mask", type=float, default=0.0, help="mask ratio (0 = the whole image)")
    s = sub.add_parser("layers", parents=[common, reading], help="<name>_layers.png: layer map, groups (Figs. 6-7)")
    s.add_argument("--layers", type=int, default=4, help="number of layers L")
    s = sub.add_parser("figure-ground", parents=[common, reading], help="<name>_fg.png mask, <name>_fg_overlay.png")
    s.add_argument("--layers", type=int, default=2, help="number of layers L")
    s = sub.add_parser("edges", parents=[common, reading], help="<name>.png soft edge map at the input's size")
    s.add_argument("--layers", type=int, default=None, help=f"one L (Fig. 8 hierarchy); default: mean over {EDGE_LAYERS}")
    s.add_argument("--tiles", type=int, default=None,
                   help="window size in pixels of the working image (--max-size; stride half): local detail")
    sub.add_parser("gaussians", parents=[common], help="<name>_gaussians.png: centres, scale vs depth, opacity")
    sub.add_parser("export", parents=[common], help="<name>.ply + <name>_cameras.json: a 3DGS scene and its camera")
    for name in IMAGE_COMMANDS:
        sub.choices[name].add_argument("images", nargs="+", help="image files and/or folders")

    zeroshot_eval.add_commands(sub, common, LAYER_THRESHOLD)
    return p


FLAG_RANGES = {"layers": "[1, inf)", "tiles": "[2, inf) a window size in pixels", "nthresh": "[1, inf)", "workers":
               "[1, inf)", "max_size": "[0, inf) 0: no bound", "seed": "[0, 4294967295]", "mask": "[0, 1)", "threshold":
               "(0, 1) a pixel's change, the largest over its channels, lies in [0, 1]", "limit": "[1, inf) leave it out"
               " for every image", "synthetic": "[0, inf) 0: a folder dataset", "size": "[8, inf) the scenes need it"}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or os.path.join("runs", "zeroshot", args.command)
    layers, tiles, nthresh = getattr(args, "layers", None), getattr(args, "tiles", None), getattr(args, "nthresh", 1)
    engine.check_ranges(parser, args, FLAG_RANGES)
    if layers == 1 and args.command in ("edges", "figure-ground", "eval-edges", "eval-fg"):
        parser.error(f"--layers 1 puts every Gaussian in one layer: {args.command} needs two or more to find a change")
    if 0 < args.max_size < 16:
        parser.error(f"--max-size must be 0 (no bound) or >= 16, got {args.max_size}: smaller maps hold no reading")
    score_folder = args.command == "eval-edges" and bool(args.pred or args.gt)
    if zeroshot_eval.missing_data(args):
        parser.error(zeroshot_eval.missing_data(args))

    net = None
    if not score_folder:
        try:
            device = engine.check_device(args.device)
            net, ckpt = load_gmae(args.ckpt, device)
            if args.command == "recon":
                check_mask_ratio(args.mask, net.cfg.num_patches)
        except (FileNotFoundError, ValueError) as e:  # device, missing, engine.CheckpointError (a ValueError), MAE
            parser.error(str(e))
        if layers is not None and layers > net.cfg.num_gaussians:
            parser.error(f"--layers {layers} is more than the model's {net.cfg.num_gaussians} Gaussians")
        photos = args.command in IMAGE_COMMANDS or (args.command in ("eval-edges", "eval-fg") and not args.synthetic)
        note = pretraining_note(ckpt, args.ckpt) if photos else None
        if note:
            print(note, file=sys.stderr)
    inputs = [*getattr(args, "images", ()), args.ckpt,
              *filter(None, (getattr(args, name, None) for name in ("bsds", "masks", "pred", "gt")))]
    try:  # before any work: never into or onto an input, and somewhere it can write
        engine.check_output(out, inputs)
        files = engine.collect_images(args.images) if args.command in IMAGE_COMMANDS else []
        engine.check_outputs_are_not_inputs(files, out, OUTPUT_SUFFIXES.get(args.command, ()))
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    os.makedirs(out, exist_ok=True)

    seed, backend, max_size = args.seed, args.splat, args.max_size
    try:
        if args.command in IMAGE_COMMANDS:
            depth, threshold = getattr(args, "depth", None), getattr(args, "threshold", None)
            edge_layers = EDGE_LAYERS if layers is None else (layers,)
            edge_thresholds = EDGE_THRESHOLDS if threshold is None else (threshold,)
            threshold = LAYER_THRESHOLD if threshold is None else threshold
            write = {
                "recon": lambda img, path, dest: run_recon(net, img, path, dest, args.mask, seed, backend, max_size),
                "layers": lambda img, path, dest: run_layers(net, img, dest, depth, layers, threshold, seed, backend),
                "figure-ground": lambda img, path, dest: run_figure_ground(net, img, dest, depth, layers, threshold,
                                                                           seed, backend, max_size),
                "edges": lambda img, path, dest: run_edges(net, img, dest, depth, edge_layers, edge_thresholds, tiles,
                                                           seed, backend, max_size),
                "gaussians": lambda img, path, dest: run_gaussians(net, img, dest),
                "export": lambda img, path, dest: run_export(net, img, dest),
            }[args.command]
            return 1 if run_on_images(args.command, files, out, write, device) else 0
        if score_folder:
            zeroshot_eval.eval_edge_folder(args.pred, args.gt, nthresh, args.workers)
        elif args.command == "eval-edges":
            items, where = zeroshot_eval.edge_items(args.synthetic, args.size, args.anywhere, args.bsds, args.split,
                                                    args.limit)
            out = os.path.join(out, where + (f"_tiles{tiles}" if tiles else ""))
            readings = edge_readings(net, tiles, backend, seed, max_size, device)
            zeroshot_eval.eval_edges(items, where, readings, out, nthresh, args.workers)
        elif args.command == "eval-fg":
            items, where = zeroshot_eval.fg_items(args.synthetic, args.size, args.anywhere, args.masks, args.limit)
            read = functools.partial(figure_ground_of, layers=layers, threshold=args.threshold, backend=backend,
                                     max_size=max_size)
            zeroshot_eval.eval_fg(items, where, gaussian_readings(net, read, seed, device), out, layers, args.threshold)
        else:
            readings = gaussian_readings(net, lambda g, H, W: g[0], seed, device)  # the Gaussians [K, 14] themselves
            zeroshot_eval.eval_depth(args.synthetic, args.size, args.anywhere, readings, out)
    except (ImportError, FileNotFoundError, ValueError, data.BrokenImageError, splat.DenseRenderTooLarge) as e:
        parser.error(str(e))
    except splat.BackendUnavailable as e:  # an explicit --splat cpu / cuda; the compiler's output runs many lines
        parser.error(f"{str(e).splitlines()[0][:300]} ... (--splat auto falls back to the torch reference)")
    return 0


if __name__ == "__main__":
    sys.exit(engine.run_main(main))
