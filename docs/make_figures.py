"""
The pictures of README.md and docs/walkthrough.md, drawn by the code they explain.

    python docs/make_figures.py          # from the repo root: docs/walkthrough/*.png, seconds on one CPU core

Nothing is trained and nothing is downloaded. The pictures come from
    - an embedded synthetic scene (data.build_dataset("synthetic", ...), validation scene SCENE),
    - untrained models (model.GMAE, seeded): masking, the decoder's tokens, the initial Gaussian centres,
    - hand-made Gaussians: the camera (footprint against depth) and front-to-back compositing,
    - 64 Gaussians fitted directly to the scene by gradient descent on their own parameters (fit_gaussians: no
      network, a few seconds): something scene-like to splat, sort by depth and read with zeroshot.py's functions.
Every picture is deterministic (seeded, one thread, the torch reference rasterizer).

This file imports zeroshot.py's reading functions (layer_map, figure_ground, ...) so the pictures show what that
code computes, not a copy of it; it is a figure script, not a stage of the pipeline, and no script imports it.

Files (docs/walkthrough/): overview.png (README), masking.png, tokens.png, queries.png, camera.png,
compositing.png, layers.png, readings.png, export.png (README: the fitted Gaussians exported by ply.py's
writers and drawn by tests/gs_viewer.py, an independent renderer in the conventions of 3DGS viewers).
"""
import colorsys
import math
import os
import sys
import tempfile
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/make_figures.py` from anywhere
sys.path.insert(0, os.path.join(ROOT, "tests"))  # gs_viewer: the tests' independent 3DGS-convention renderer

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import data  # noqa: E402
import gs_viewer  # noqa: E402
import model  # noqa: E402
import ply  # noqa: E402
import splat  # noqa: E402
import zeroshot  # noqa: E402
from model import GMAE, GMAEConfig  # noqa: E402

OUT = os.path.join(ROOT, "docs", "walkthrough")
SCENE = 7  # a validation scene: a striped triangle over a few small occluders
PANEL = 128  # displayed panel size in pixels (a 32 px image at 4x)
BACKEND = "torch"  # the reference rasterizer: exact, and no compiler needed
FONT = ImageFont.load_default(size=11)
WHITE, GREY, BLACK = (255, 255, 255), (150, 150, 150), (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------
# Drawing helpers (PIL only)


def to_pil(x, size=PANEL):
    """[3, h, w] or [h, w] tensor in [0, 1] -> RGB PIL image of size x size (nearest neighbour: pixels stay square)."""
    img = Image.fromarray(data.to_uint8(x)).convert("RGB")
    return img.resize((size, size), Image.NEAREST)


def labelled(img, text, width=None):
    """img with its lines of text above it, widened to the text if need be."""
    lines = text.split("\n")
    w = max(img.width, width or 0, *(math.ceil(FONT.getlength(line)) + 4 for line in lines))
    out = Image.new("RGB", (w, img.height + 14 * len(lines) + 4), WHITE)
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, 2 + 14 * i), line, fill=BLACK, font=FONT)
    out.paste(img, (0, 14 * len(lines) + 4))
    return out


def arrow(text, width=96, height=PANEL):
    """A right arrow with a short caption above it (lines split on '\\n')."""
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    y = height // 2
    draw.line([(6, y), (width - 8, y)], fill=BLACK, width=2)
    draw.polygon([(width - 4, y), (width - 12, y - 5), (width - 12, y + 5)], fill=BLACK)
    for i, line in enumerate(text.split("\n")):
        draw.text((6, y - 14 * (len(text.split("\n")) - i) - 2), line, fill=BLACK, font=FONT)
    return img


def hstack(images, gap=6):
    """Images side by side, bottom-aligned, on white."""
    h = max(im.height for im in images)
    out = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), h), WHITE)
    x = 0
    for im in images:
        out.paste(im, (x, h - im.height))
        x += im.width + gap
    return out


def vstack(images, gap=10):
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)),
                    WHITE)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def grid_lines(img, cells, colour=(255, 255, 255)):
    """Draw the patch grid (cells x cells) over a square PIL image."""
    draw = ImageDraw.Draw(img)
    for i in range(1, cells):
        t = round(i * img.width / cells)
        draw.line([(t, 0), (t, img.height)], fill=colour)
        draw.line([(0, t), (img.width, t)], fill=colour)
    return img


def ellipses(g, size=PANEL, sigmas=1.0):
    """Each Gaussian [1, K, 14] as its projected 1-sigma ellipse (splat.project at size x size), filled with its colour
    at half its opacity, far ones drawn first so near ones lie on top."""
    means, conic, depth, rgb, opacity, _ = splat.project(g, size, size)
    a, b, c = conic[0].unbind(-1)
    det = a * c - b * b
    sigma2 = torch.stack([c / det, -b / det, -b / det, a / det], -1).reshape(-1, 2, 2)  # conic^-1 = Sigma2
    evals, evecs = torch.linalg.eigh(sigma2.double())
    layer = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    t = torch.linspace(0, 2 * math.pi, 33, dtype=torch.float64)[:-1]
    circle = torch.stack([t.cos(), t.sin()])  # [2, 32]
    for i in torch.argsort(depth[0], descending=True).tolist():
        pts = means[0, i, :, None].double() + sigmas * evecs[i] @ (evals[i].clamp_min(0).sqrt()[:, None] * circle)
        colour = tuple(int(v * 255) for v in rgb[0, i]) + (int(128 * opacity[0, i]),)
        over = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        ImageDraw.Draw(over).polygon([tuple(p) for p in pts.T.tolist()], fill=colour, outline=(0, 0, 0, 90))
        layer = Image.alpha_composite(layer, over)
    return layer.convert("RGB")


def gaussian(xy, z, scale, rgb, opacity):
    """One hand-made valid Gaussian [14]: identity rotation, isotropic scale."""
    return torch.tensor([*xy, z, scale, scale, scale, 1.0, 0.0, 0.0, 0.0, *rgb, opacity])


def token_colour(j):
    """A bright colour per query token j: neighbouring tokens get well-separated hues."""
    return tuple(int(255 * v) for v in colorsys.hsv_to_rgb(j * 0.38 % 1, 0.9, 0.85))


def save(img, name):
    img.save(os.path.join(OUT, name))
    print(f"wrote docs/walkthrough/{name} ({img.width} x {img.height})")


# ---------------------------------------------------------------------------------------------------------
# A scene and Gaussians fitted to it


def scene():
    """Validation scene SCENE at the laptop size: dict of image [3, 32, 32], mask, boundary (data.SyntheticScenes)."""
    return data.build_dataset("synthetic", 32, train=False, n_synthetic=SCENE + 1).scene(SCENE)


def fit_gaussians(img, k=64, steps=300, scale_max=2.0, seed=0):
    """k Gaussians fitted to one image [3, H, W] by Adam on their raw parameters, through model.gaussian_activation
    and splat.render, with the whole-image MSE. Centres start on model.anchor_grid(k) (as anchored queries do),
    depths at random. No network: this is what a decoder's output could look like for this image."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(1, k, splat.PARAM_DIM, generator=gen) * 0.5
    raw[0, :, 0:2] = torch.atanh(model.anchor_grid(k)).float()
    raw.requires_grad_()
    opt = torch.optim.Adam([raw], lr=0.05)
    H, W = img.shape[-2:]
    for _ in range(steps):
        pred = splat.render(model.gaussian_activation(raw, scale_max), H, W, backend=BACKEND)
        loss = ((pred - img[None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = model.gaussian_activation(raw.detach(), scale_max)
    psnr = model.psnr(splat.render(g, H, W, backend=BACKEND), img[None])
    print(f"fit {k} Gaussians to scene {SCENE}: PSNR {psnr:.1f} dB")
    return g


# ---------------------------------------------------------------------------------------------------------
# The figures


def masked_view(img, mask, p, fill=0.5):
    """img [3, H, W] with the masked patches (mask [N], 1 = masked) filled with grey."""
    patches = model.patchify(img[None], p)
    patches = torch.where(mask.bool()[None, :, None], torch.full_like(patches, fill), patches)
    return model.unpatchify(patches, p, *img.shape[-2:])[0]


def draw_masking(img, cfg):
    """masking.png: the scene with its patch grid, what the encoder sees, the region the loss scores."""
    gen = torch.Generator().manual_seed(0)
    _, mask, _, _ = model.random_masking(model.patchify(img[None], cfg.patch_size), cfg.mask_ratio, gen)
    cells, n_vis = cfg.img_size // cfg.patch_size, int((1 - mask[0]).sum())
    loss_region = img * model.unpatchify(mask[0, None, :, None].expand(-1, -1, 3 * cfg.patch_size**2),
                                         cfg.patch_size, cfg.img_size, cfg.img_size)[0]
    panels = [labelled(grid_lines(to_pil(img), cells), f"{cfg.img_size} px, {cells} x {cells} patches"),
              labelled(grid_lines(to_pil(masked_view(img, mask[0], cfg.patch_size)), cells),
                       f"encoder input: {n_vis} visible\n(random_masking, m = {cfg.mask_ratio})"),
              labelled(grid_lines(to_pil(loss_region), cells), f"loss region, --loss-on masked:\n"
                                                               f"the {cfg.num_patches - n_vis} masked patches")]
    save(hstack(panels, gap=12), "masking.png")
    return mask[0]


def token_row(kinds, colours, label, box=9):
    """One decoder input sequence as a row of coloured squares, with a label above."""
    img = Image.new("RGB", (len(kinds) * (box + 1) + 1, box + 2), WHITE)
    draw = ImageDraw.Draw(img)
    for i, kind in enumerate(kinds):
        draw.rectangle([i * (box + 1) + 1, 1, i * (box + 1) + box, box], fill=colours[kind], outline=GREY)
    return labelled(img, label)


def draw_tokens(mask, cfg):
    """tokens.png: the decoder's input sequence in MAE (PixelDecoder) and GMAE (GaussianDecoder, Eq. 1)."""
    colours = {"cls": (60, 60, 60), "latent": (70, 130, 220), "mask": (200, 200, 200), "query": (240, 150, 40)}
    n_vis = int((1 - mask).sum())
    mae = ["cls"] + ["mask" if m else "latent" for m in mask.tolist()]  # unshuffled to patch order
    g8 = GMAEConfig.preset("tiny", num_gaussians=512)
    rows = [token_row(mae, colours, f"MAE (PixelDecoder): cls + {n_vis} latents + {len(mae) - 1 - n_vis} mask tokens, "
                                    f"in patch order = {len(mae)} tokens; the head reads the {cfg.num_patches} patch "
                                    f"tokens as {3 * cfg.patch_size**2} pixels each"),
            token_row(["cls"] + ["latent"] * n_vis + ["query"] * cfg.num_queries, colours,
                      f"GMAE (GaussianDecoder, Eq. 1): cls + {n_vis} latents ++ {cfg.num_queries} query tokens = "
                      f"{1 + n_vis + cfg.num_queries} tokens, no mask tokens; the head reads each query as "
                      f"{splat.PARAM_DIM} numbers: one Gaussian"),
            token_row(["cls"] + ["latent"] * n_vis + ["query"] * g8.num_queries, colours,
                      f"GMAE --gaussians {g8.num_gaussians} (g = {g8.gaussians_per_token}): {g8.num_queries} query "
                      f"tokens, each read as {g8.gaussians_per_token} x {splat.PARAM_DIM} numbers = "
                      f"{g8.num_gaussians} Gaussians")]
    key = Image.new("RGB", (520, 14), WHITE)
    draw = ImageDraw.Draw(key)
    for i, (name, colour) in enumerate(colours.items()):
        draw.rectangle([i * 130, 2, i * 130 + 9, 11], fill=colour, outline=GREY)
        draw.text((i * 130 + 14, 0), {"cls": "cls token", "latent": "visible latent", "mask": "mask token",
                                       "query": "query token"}[name], fill=BLACK, font=FONT)
    save(vstack(rows + [key]), "tokens.png")


def draw_queries(img, cfg):
    """queries.png: where an untrained GMAE's Gaussians start (mask 0.75), and what it draws there."""
    configs = [("paper, --no-anchors:\nfree queries N(0, 1)", replace(cfg, anchors=False)),
               ("laptop default, --anchors:\none Gaussian per grid point", cfg),
               ("--gaussians 512, g = 8:\n64 tokens x 8 on a sub-grid", GMAEConfig.preset("tiny", num_gaussians=512))]
    tops, bottoms = [], []
    for label, c in configs:
        torch.manual_seed(0)
        net = GMAE(c).eval()
        with torch.no_grad():
            g, _ = net.gaussians(img[None], c.mask_ratio, torch.Generator().manual_seed(0))
        dots = grid_lines(to_pil(img * 0.35 + 0.65), c.img_size // c.patch_size, colour=(215, 215, 215))
        draw = ImageDraw.Draw(dots)
        for i, (x, y) in enumerate(g[0, :, 0:2].tolist()):
            u, v = (x + 1) * PANEL / 2, (y + 1) * PANEL / 2
            token = i // c.gaussians_per_token
            colour = BLACK if c.gaussians_per_token == 1 else token_colour(token)
            r = 1.5 if c.gaussians_per_token == 1 else 1.0
            draw.ellipse([u - r, v - r, u + r, v + r], fill=colour)
        tops.append(labelled(dots, label))
        with torch.no_grad():
            bottoms.append(to_pil(splat.render(g, PANEL, PANEL, backend=BACKEND)[0]))
    save(vstack([hstack(tops, gap=12), labelled(hstack(bottoms, gap=12), "their render at initialisation")]),
         "queries.png")


def draw_camera():
    """camera.png: one Gaussian at three depths (the footprint scales with 8 / (z + 8)); two Gaussians whose depth
    order decides which one covers the other."""
    size, panels = 96, []
    for z in (-1.0, 0.0, 1.0):
        g = gaussian((0.0, 0.0), z, 2.0, (0.2, 0.4, 0.8), 0.9)[None, None]
        _, conic, _, _, _, extent = splat.project(g, size, size)
        a, b, c = conic[0, 0].tolist()
        std = math.sqrt(c / (a * c - b * b))  # Sigma2_xx = c / det(conic)
        img = to_pil(splat.render(g, size, size, backend=BACKEND)[0], size)
        ex = extent[0, 0, 0].item()
        ImageDraw.Draw(img).rectangle([size / 2 - ex, size / 2 - ex, size / 2 + ex, size / 2 + ex], outline=GREY)
        panels.append(labelled(img, f"z = {z:+.0f}: zc = {z + splat.CAMERA_DISTANCE:.0f}\nstd {std:.2f} px"))
    pair = []
    for z_red, z_blue in ((-0.5, 0.5), (0.5, -0.5)):
        g = torch.stack([gaussian((-0.2, 0.0), z_red, 1.6, (0.85, 0.2, 0.15), 0.95),
                         gaussian((0.2, 0.0), z_blue, 1.6, (0.15, 0.3, 0.85), 0.95)])[None]
        near = "red" if z_red < z_blue else "blue"
        pair.append(labelled(to_pil(splat.render(g, size, size, backend=BACKEND)[0], size),
                             f"red z {z_red:+.1f}, blue z {z_blue:+.1f}:\n{near} in front, and larger"))
    save(hstack(panels + [Image.new("RGB", (14, 1), WHITE)] + pair, gap=8), "camera.png")


def draw_compositing():
    """compositing.png: five hand-made Gaussians composited front to back; the second row is the transmittance T
    left after the first n (the same render with black colours: image = 0 + T x white)."""
    size = 96
    g = torch.stack([gaussian((-0.3, -0.2), -0.8, 1.4, (0.95, 0.75, 0.1), 0.7),
                     gaussian((0.25, -0.25), -0.4, 1.6, (0.2, 0.6, 0.9), 0.8),
                     gaussian((0.0, 0.3), 0.0, 1.8, (0.85, 0.2, 0.3), 0.85),
                     gaussian((-0.1, 0.05), 0.4, 2.6, (0.3, 0.7, 0.3), 0.9),
                     gaussian((0.2, 0.1), 0.8, 4.0, (0.45, 0.3, 0.6), 0.95)])[None]
    black = g.clone()
    black[..., 10:13] = 0
    colours, transmittance = [], []
    for n in range(g.shape[1] + 1):
        colours.append(labelled(to_pil(splat.render(g[:, :n], size, size, backend=BACKEND)[0], size),
                                "background" if n == 0 else f"first {n} (z {g[0, n - 1, 2]:+.1f})"))
        transmittance.append(to_pil(splat.render(black[:, :n], size, size, backend=BACKEND)[0], size))
    save(vstack([hstack(colours), labelled(hstack(transmittance), "T after them (white = 1: the background still "
                                                                  "shows; black = 0: covered)")]), "compositing.png")


def draw_overview(img, mask, g, cfg):
    """overview.png (README): image -> visible patches -> the decoder's Gaussians -> splatted render -> masked loss."""
    render = splat.render(g, PANEL, PANEL, backend=BACKEND)[0]
    render_32 = splat.render(g, cfg.img_size, cfg.img_size, backend=BACKEND)[0]
    err = ((render_32 - img) ** 2).mean(0, keepdim=True).expand(3, -1, -1)
    err = masked_view(err / err.max(), mask, cfg.patch_size, fill=0.0)
    cells = cfg.img_size // cfg.patch_size
    row = [labelled(to_pil(img), "image"),
           arrow("mask 75 %"),
           labelled(grid_lines(to_pil(masked_view(img, mask, cfg.patch_size)), cells), "visible patches"),
           arrow("ViT encoder;\ndecoder with\nk query tokens"),
           labelled(ellipses(g), f"k = {g.shape[1]} Gaussians"),
           arrow("splat\n(fixed camera)"),
           labelled(to_pil(render), "render"),
           arrow("MSE on the\nmasked patches"),
           labelled(to_pil(err), "squared error there")]
    save(hstack(row, gap=4), "overview.png")


def paint_order_depth(g, layers):
    """The Gaussians with z set from the scene's paint order under each centre (layers [S, S]: 0 background,
    higher = painted later = nearer): z = 1 - 2 id / max id, so the foreground is nearest. The depth a model would
    have to learn for the readings to find the object; hand-set here to show what the readings then give."""
    S = layers.shape[-1]
    cols = ((g[0, :, 0] + 1) * S / 2).long().clamp(0, S - 1)
    rows = ((g[0, :, 1] + 1) * S / 2).long().clamp(0, S - 1)
    ids = layers[rows, cols].float()
    g = g.clone()
    g[0, :, 2] = 1 - 2 * ids / ids.max().clamp_min(1)
    print(f"paint-order depth: {int((ids == ids.max()).sum())} of {g.shape[1]} Gaussians centred on the foreground")
    return g


def draw_layers(sc, g_paint):
    """layers.png: zeroshot.layers_strip (paper Figs. 6-7) of the fitted Gaussians with paint-order depth: input,
    all, layer map, each of L = 4 depth groups alone, the first K/8 .. K nearest."""
    save(zeroshot.layers_strip(g_paint, sc["image"], 4, 0.1, backend=BACKEND), "layers.png")


def readings_row(g, label):
    """Layer map (L = 2), figure-ground mask and soft edge map of Gaussians [1, K, 14], as zeroshot.py reads them."""
    ids = zeroshot.layer_map(zeroshot.cumulative_renders(g, PANEL, PANEL, 2, backend=BACKEND), 0.1)[0]
    panels = [labelled(to_pil(zeroshot.colour_ids(ids, 2)), f"{label}:\nlayer map, L = 2"),
              labelled(to_pil(zeroshot.figure_ground(ids).float()), "figure-ground\n(Otsu, less border)"),
              labelled(to_pil(zeroshot.soft_edges(g, PANEL, PANEL, backend=BACKEND)[0]),
                       "soft edges\n(L = 2, 4, 8; 3 thresholds)")]
    return hstack(panels)


def draw_readings(sc, g, g_paint):
    """readings.png: zeroshot.py's readings of the fitted Gaussians, with the fit's own depth and with paint-order
    depth, under the scene and its ground truth."""
    truth = hstack([labelled(to_pil(sc["image"]), "input"), labelled(to_pil(sc["mask"].float()), "true foreground"),
                    labelled(to_pil(sc["boundary"].float()), "true boundaries")])
    save(vstack([truth, readings_row(g, "depth of the fit"),
                 readings_row(g_paint, "paint-order depth")]), "readings.png")


def draw_export(g, H=96, W=144):
    """export.png (README): the fitted Gaussians drawn by the project at H x W, then exported as zeroshot.py export
    does (splat.to_pinhole, write_ply, write_cameras) and drawn by tests/gs_viewer.py as a 3DGS viewer would; last,
    the file as exports were before the scene was placed for a pinhole camera (footprints 8 x too wide)."""
    ours = splat.render(g.double(), H, W, backend=BACKEND)[0]
    scene, camera = splat.to_pinhole(g[0], H, W)
    with tempfile.TemporaryDirectory() as tmp:
        path, cams, old = (os.path.join(tmp, name) for name in ("scene.ply", "scene_cameras.json", "old.ply"))
        ply.write_ply(path, scene)
        ply.write_cameras(cams, "scene", camera)
        viewed = torch.from_numpy(gs_viewer.render(path, cams))
        scene[:, 3:6] *= splat.CAMERA_DISTANCE
        ply.write_ply(old, scene)
        before = torch.from_numpy(gs_viewer.render(old, cams))
    big = lambda x: Image.fromarray(data.to_uint8(x)).convert("RGB").resize((2 * W, 2 * H), Image.NEAREST)  # noqa: E731
    panels = [labelled(big(ours), f"the project's render, {W} x {H}"),
              labelled(big(viewed), f"the export in a 3DGS viewer ({gs_viewer.psnr(viewed, ours):.0f} dB)"),
              labelled(big(before), f"before: footprints 8 x wide ({gs_viewer.psnr(before, ours):.0f} dB)")]
    save(hstack(panels, gap=12), "export.png")


def main():
    torch.set_num_threads(1)  # one thread: the same float order, so the same pixels, on every run
    os.makedirs(OUT, exist_ok=True)
    cfg = GMAEConfig.preset("tiny")  # train.py's defaults: 32 px, patch 4, mask 0.75, 64 anchored Gaussians
    sc = scene()
    img = sc["image"]
    mask = draw_masking(img, cfg)
    draw_tokens(mask, cfg)
    draw_queries(img, cfg)
    draw_camera()
    draw_compositing()
    g = fit_gaussians(img, k=cfg.num_gaussians, scale_max=cfg.scale_max)
    draw_overview(img, mask, g, cfg)
    g_paint = paint_order_depth(g, sc["layers"])
    draw_layers(sc, g_paint)
    draw_readings(sc, g, g_paint)
    draw_export(g)


if __name__ == "__main__":
    main()
