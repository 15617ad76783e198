"""
The embedded synthetic data: "dead leaves" scenes drawn with numpy, no download (data.SyntheticScenes serves them).

A background, then 1-4 small flat occluders, then one large upright foreground object (radius 0.3-0.36 of the
image, near the centre, drawn last) whose class picks its shape and texture:
    label c  ->  shape SHAPES[c % 5] in {disk, square, triangle, plus, ring},
                 texture TEXTURES[c // 5] in {flat, stripes, checker}       (up to 15 classes; default 10)
with random colour, size and position (and stripe angle). The class is the one big shape in the picture (the
occluders are at most half its radius, never textured), so a 4-minute self-supervised run learns it: a linear
probe on its features lands well above the same encoder untrained (probe.py --random-init). Shapes are signed
distance fields sdf(p) in pixels (negative inside), painted with coverage clip(0.5 - sdf, 0, 1): one line of
anti-aliasing, no supersampling. The ground truth for zero-shot evaluation (zeroshot.py):
    layers [H, W] id of the visible shape (0 background, higher = nearer), mask = foreground pixels,
    boundary = pixels whose layer id differs from the right or lower neighbour.

Try it:  python scenes.py --out synthetic_grid.png    (16 scenes: image | foreground mask | boundaries)
"""
import argparse
import math

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle", "plus", "ring")
TEXTURES = ("flat", "stripes", "checker")

def _sdf(kind, u, v, r, aspect=1.0):
    """Signed distance in pixels (negative inside) of a shape of radius r centred at the origin of its own
    rotated frame (u, v). Polygons use max over edge distances: exact on the edges, which is all the
    anti-aliasing needs."""
    if kind == "disk":
        return np.hypot(u, v) - r
    if kind == "ring":  # annulus between 0.4 r and r
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if kind == "rect":
        return np.maximum(np.abs(u) - r, np.abs(v) - aspect * r)
    if kind == "plus":  # union of two bars = min of their distances
        return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - 0.3 * r), np.maximum(np.abs(u) - 0.3 * r, np.abs(v) - r))
    if kind == "triangle":  # equilateral, circumradius 1.25 r: edges at distance 1.25 r / 2 from the centre
        edges = np.maximum(np.maximum(-v, 0.866 * u + 0.5 * v), -0.866 * u + 0.5 * v)
        return edges - 0.625 * r
    raise ValueError(f"unknown shape {kind!r}")


def _paint(rng, texture, colour, x, y, img_size):
    """Colour field of a shape: flat, or colour plus a contrasting second colour in stripes or a checkerboard."""
    if texture == "flat":
        return colour
    # Second colour: a much darker shade of a light colour, or a much lighter shade of a dark one.
    second = colour * 0.3 if colour.mean() > 0.5 else 0.7 + 0.3 * colour
    period = max(3.0, rng.uniform(0.2, 0.3) * img_size)  # 2-3 periods across the foreground, wide enough for Gaussians
    angle, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    c, s, f = math.cos(angle), math.sin(angle), 2 * math.pi / period
    wave = np.sin((x * c + y * s) * f + phase)
    if texture == "checker":
        wave = wave * np.sin((y * c - x * s) * f)
    w = np.clip(0.5 + 2.0 * wave, 0, 1)[..., None]  # a square wave with soft (anti-aliased) edges
    return colour * (1 - w) + second * w


def _background(rng, x, y, img_size):
    kind = rng.integers(3)
    c0, c1 = rng.uniform(0.05, 0.95, 3).astype(np.float32), rng.uniform(0.05, 0.95, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(angle) + y * math.sin(angle)) / img_size  # in about [-1.4, 1.4]
    if kind == 0:  # flat
        return np.broadcast_to(c0, x.shape + (3,))
    if kind == 1:  # linear gradient
        w = (t - t.min()) / (t.max() - t.min())
    else:  # slow waves
        w = 0.5 + 0.5 * np.sin(t * rng.uniform(4, 10) + rng.uniform(0, 2 * math.pi))
    return c0 * (1 - w[..., None]) + c1 * w[..., None]


def render_scene(rng, img_size, label, max_occluders=4, fg_anywhere=False):
    """One dead-leaves scene: background, 1..max_occluders small flat occluders, then the foreground of class
    `label`, large and drawn last, so it is the one object that dominates the image and is never hidden.
    The foreground stands upright (not turned), so each class has one silhouette; its centre is
    drawn in [0.4, 0.6] of the image (near the centre), or in [0.1, 0.9] with
    fg_anywhere (the same random draws, so everything else in the scene stays as it is): a val set where a
    centre prior cannot find the object (zeroshot.py's control).
    Returns image uint8 [H, W, 3], layers int64 [H, W] (0 background, k = k-th shape painted) and the
    foreground's layer id."""
    coords = np.arange(img_size, dtype=np.float32) + 0.5  # pixel i has its centre at i + 0.5
    x, y = np.meshgrid(coords, coords)  # [H, W] each; x right, y down
    img = _background(rng, x, y, img_size)  # [H, W, 3]
    layers = np.zeros((img_size, img_size), np.int64)

    # Occluders: anywhere, flat, at most about half the foreground's radius, so neither their shape nor a
    # texture competes with the class. The foreground: near the centre, upright, 0.3-0.36 of the image in
    # radius (about a third of the pixels for a disk), drawn last.
    shapes = []
    for _ in range(rng.integers(1, max_occluders + 1)):
        kind = ("disk", "rect", "triangle")[rng.integers(3)]
        r = img_size * math.exp(rng.uniform(math.log(0.06), math.log(0.16)))
        shapes.append((kind, "flat", r, rng.uniform(0, img_size, 2)))
    r = img_size * rng.uniform(0.3, 0.36)
    lo, hi = (0.1, 0.9) if fg_anywhere else (0.4, 0.6)
    shapes.append((SHAPES[label % len(SHAPES)], TEXTURES[label // len(SHAPES)], r, rng.uniform(lo, hi, 2) * img_size))

    for k, (kind, texture, r, (cx, cy)) in enumerate(shapes, start=1):
        turn = 0.0 if k == len(shapes) else math.pi  # the foreground upright, occluders at any angle
        angle, aspect = rng.uniform(-turn, turn), rng.uniform(0.5, 1.0)  # aspect: rect occluders only
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * (x - cx) + s * (y - cy), c * (y - cy) - s * (x - cx)  # the shape's rotated frame
        sdf = _sdf(kind, u, v, r, aspect)
        inside = sdf <= 0
        colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        if k == len(shapes):  # keep the foreground visible: redraw a colour too close to its surroundings
            around = (sdf > 0) & (sdf <= 3)
            surround = img[around].mean(0) if around.any() else colour
            for _ in range(10):
                if np.abs(colour - surround).sum() > 0.6:
                    break
                colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        cover = np.clip(0.5 - sdf, 0, 1)[..., None]  # pixel coverage, >= 0.5 exactly where sdf <= 0
        img = img * (1 - cover) + _paint(rng, texture, colour, x, y, img_size) * cover
        layers[inside] = k
    return np.round(img * 255).astype(np.uint8), layers, len(shapes)


def boundary_map(layers):
    """Integer map [..., H, W] (numpy array or torch tensor) -> bool map of the same kind, True where the id
    differs from the right or lower neighbour: one pixel wide, on one side. The ground truth of the synthetic
    scenes and zeroshot.py's edges of a layer map both use it."""
    b = layers != layers  # all False, of the input's kind (integer ids are never NaN)
    b[..., :, :-1] |= layers[..., :, :-1] != layers[..., :, 1:]
    b[..., :-1, :] |= layers[..., :-1, :] != layers[..., 1:, :]
    return b


# ----------------------------------------------------------------------------- a picture of the scenes

def scene_grid(dataset, n=16, cols=4, zoom=4):
    """PIL image of n scenes, each as three panels: image | foreground mask | boundaries in red."""
    s = dataset.img_size
    gap = np.full((s, 2, 3), 255, np.uint8)
    grid = Image.new("RGB", (cols * (3 * s + 6), -(-n // cols) * (s + 2)), (255, 255, 255))
    for i in range(n):
        sc = dataset.scene(i)
        img = np.round(sc["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # [H, W, 3]
        mask = np.repeat(sc["mask"].numpy()[..., None], 3, axis=2).astype(np.uint8) * 255
        edges = img.copy()
        edges[sc["boundary"].numpy()] = (255, 0, 0)
        tile = np.concatenate([img, gap, mask, gap, edges, gap], axis=1)
        grid.paste(Image.fromarray(tile), ((i % cols) * (3 * s + 6), (i // cols) * (s + 2)))
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save a grid of synthetic dead-leaves scenes.")
    parser.add_argument("--out", default="synthetic_grid.png", help="PNG file to write")
    parser.add_argument("--n", type=int, default=16, help="number of scenes")
    parser.add_argument("--img-size", type=int, default=32, help="scene size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--fg-anywhere", action="store_true", help="place the foreground object anywhere, not near the centre")
    args = parser.parse_args()
    from data import SyntheticScenes  # the Dataset around these scenes (data.py imports this file)

    ds = SyntheticScenes(args.n, args.img_size, seed=args.seed, fg_anywhere=args.fg_anywhere)
    scene_grid(ds, args.n).save(args.out)
    print(f"wrote {args.out}: {args.n} scenes ({', '.join(ds.classes)})")
