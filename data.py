"""
Data for GMAE: an embedded synthetic dataset, image folders, and the MAE transforms written with PIL + torch.

Every dataset returns (image, label) with image a float tensor [3, H, W] in [0, 1]. The model normalises
pixels itself (model.normalize) because the encoder sees ImageNet-normalised pixels while the loss
compares renders with [0, 1] pixels (docs/design.md 1).

1. SyntheticScenes: "dead leaves" scenes drawn by scenes.py, no download: a background, a few small occluders
   and one large foreground object whose class picks its shape and texture (up to 15 classes; default 10).
   Item i comes from numpy's Generator seeded with (seed, i), so it is the same in every run and worker.
   `scene(i)` also gives the ground truth for zero-shot evaluation: layers, foreground mask, boundaries.
2. ImageFolderDataset (root/<class>/<image>) and FlatFolderDataset (all images under a folder, label -1);
   labelled_splits gives probe.py and finetune.py a train and a val split with the same classes.
   Any PIL mode is read as 8-bit RGB (to_rgb: grayscale, CMYK, palette, 16-bit scaled, transparency on
   white). A file that cannot be decoded (missing, corrupt, truncated) gives item None and one warning;
   make_loader's collate drops it, so a long run never stops on one bad file.
3. Transforms on PIL images: RandomResizedCrop (torchvision's sampling), RandomHorizontalFlip, Resize,
   CenterCrop, then to_tensor. They draw random numbers from torch's global RNG; make_loader seeds it for
   each item from (seed, epoch, index) (SeededItems), so an item's crop is the same in every worker, process
   and resumed run.

Shapes: B batch, H x W pixels.  dataset[i] -> (image [3, H, W] in [0, 1], label int).

Try it:  python scenes.py --out synthetic_grid.png    (16 scenes: image | foreground mask | boundaries)
"""
import hashlib
import itertools
import math
import os
import signal
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from scenes import SHAPES, TEXTURES, boundary_map, render_scene

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # a GIF: its first frame
VAL_SEED_OFFSET = 1_000_000  # the synthetic val split uses seed + this, so train and val never share scenes


# ----------------------------------------------------------------------------- transforms (PIL in, PIL out)

def to_tensor(img):
    """PIL image -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def to_uint8(x):
    """Float tensor [3, H, W] (or [H, W]) in [0, 1] -> uint8 numpy array [H, W, 3] (or [H, W]) for PIL: the
    inverse of to_tensor, values outside [0, 1] clipped."""
    x = x.detach().clamp(0, 1).cpu()
    x = x.permute(1, 2, 0) if x.dim() == 3 else x
    return (x.numpy() * 255).round().astype(np.uint8)


def _pair(size):
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return h, w


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class RandomResizedCrop:
    """MAE's pretraining crop: a random box with area fraction in `scale` and aspect ratio in `ratio`,
    resized to `size` (bicubic). Sampling as torchvision: 10 tries, then a centre crop of clamped ratio."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = _pair(size), scale, ratio

    def get_params(self, width, height):
        """Returns the crop box (top, left, h, w) in pixels."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,)).item()
                left = torch.randint(0, width - w + 1, (1,)).item()
                return top, left, h, w
        # No box fitted (a very elongated image): centre crop with the aspect ratio clamped into `ratio`.
        in_ratio = width / height
        w, h = width, height
        if in_ratio < min(self.ratio):
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w = int(round(h * max(self.ratio)))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        top, left, h, w = self.get_params(*img.size)
        box = (left, top, left + w, top + h)
        return img.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC, box=box)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1).item() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class Resize:
    """Resize so the shorter side is `size`, keeping the aspect ratio (bicubic, as MAE's eval)."""

    def __init__(self, size):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Resize takes the shorter side as a positive int, got {size!r}")
        self.size = size

    def __call__(self, img):
        w, h = img.size
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        (ch, cw), (w, h) = self.size, img.size
        if ch > h or cw > w:
            raise ValueError(f"CenterCrop({ch}x{cw}) needs an image at least that large, got {h}x{w}; Resize first")
        top, left = int(round((h - ch) / 2)), int(round((w - cw) / 2))
        return img.crop((left, top, left + cw, top + ch))


def train_transform(img_size):
    """MAE pretraining augmentation: random resized crop (scale 0.2-1) + horizontal flip."""
    return Compose([RandomResizedCrop(img_size, scale=(0.2, 1.0)), RandomHorizontalFlip(), to_tensor])


def eval_transform(img_size):
    """Standard evaluation: resize the shorter side to img_size / 0.875, centre crop img_size."""
    return Compose([Resize(int(img_size / 0.875)), CenterCrop(img_size), to_tensor])


def _apply(transform, img):
    """Runs the transform on a PIL image; always returns a tensor [3, H, W] in [0, 1]."""
    out = transform(img) if transform is not None else img
    return to_tensor(out) if isinstance(out, Image.Image) else out


# ----------------------------------------------------------------------------- synthetic dead-leaves scenes

class SyntheticScenes(Dataset):
    """n dead-leaves scenes of img_size x img_size; item i has label i % num_classes (balanced classes)."""

    def __init__(self, n, img_size=32, num_classes=10, seed=0, transform=None, fg_anywhere=False):
        max_classes = len(SHAPES) * len(TEXTURES)
        if n < 1:
            raise ValueError(f"SyntheticScenes needs n >= 1 images, got {n}")
        if img_size < 8:
            raise ValueError(f"SyntheticScenes needs img_size >= 8 to draw recognisable shapes, got {img_size}")
        if not 1 <= num_classes <= max_classes:
            raise ValueError(f"num_classes must be in 1..{max_classes} (5 shapes x 3 textures), got {num_classes}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n, self.img_size, self.num_classes, self.seed, self.transform = n, img_size, num_classes, seed, transform
        self.fg_anywhere = fg_anywhere  # foreground centre anywhere in [0.1, 0.9] of the image, not near the centre
        self.classes = [f"{SHAPES[c % len(SHAPES)]}-{TEXTURES[c // len(SHAPES)]}" for c in range(num_classes)]

    def __len__(self):
        return self.n

    def _render(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"scene index {i} out of range for {self.n} scenes")
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, i])  # depends on (seed, i) only: any order, any worker
        img, layers, fg = render_scene(rng, self.img_size, label, fg_anywhere=self.fg_anywhere)
        return img, layers, fg, label

    def __getitem__(self, i):
        img, _, _, label = self._render(i)
        return _apply(self.transform, Image.fromarray(img)), label

    def scene(self, i):
        """Untransformed scene i with its ground truth: dict of image [3, H, W] float in [0, 1], label int,
        mask [H, W] bool (visible foreground), boundary [H, W] bool, layers [H, W] int64."""
        img, layers, fg, label = self._render(i)
        return {
            "image": torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0),
            "label": label,
            "mask": torch.from_numpy(layers == fg),
            "boundary": torch.from_numpy(boundary_map(layers)),
            "layers": torch.from_numpy(layers),
        }


# ----------------------------------------------------------------------------- image folders

def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def list_images(folder):
    """Every image file under folder (recursive, extensions case-insensitive, hidden files skipped), sorted, each
    once: symbolic links are followed, but a folder or file reached twice (a link loop, two links to one place) is
    listed the first time only."""
    paths, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real_dir = os.path.realpath(dirpath)  # once per folder; a file's is real_dir/name unless it is a link
        seen.add(real_dir)
        subdirs = {d: os.path.realpath(os.path.join(dirpath, d)) for d in sorted(dirnames) if not d.startswith(".")}
        dirnames[:] = [d for d, real in subdirs.items() if real not in seen]
        seen.update(subdirs.values())
        for f in sorted(filter(_is_image, filenames)):
            path = os.path.join(dirpath, f)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dir, f)
            if real not in seen:
                seen.add(real)
                paths.append(path)
    return paths


def _check_dir(root):
    if os.path.isfile(root):
        raise FileNotFoundError(f"--data {root} is a file; give the folder that holds the images")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root} does not exist; check the path or use data='synthetic'")


def _no_images(where):
    return FileNotFoundError(f"no images found under {where} (looked for {', '.join(IMG_EXTENSIONS)}, any case)")


class BrokenImageError(RuntimeError):
    """An image file that cannot be decoded: missing, unreadable, corrupt or truncated."""


class BrokenImageWarning(UserWarning):
    """An image folder dataset skipped a file (one warning per file and process)."""


_warned_paths = set()


def to_rgb(im, background=(255, 255, 255)):
    """Any PIL image -> 8-bit RGB. Grayscale, bilevel, CMYK, YCbCr and palette images convert directly;
    integer images of more than 8 bits are scaled by 255 / 65535, decided by the mode, never by the image's own
    values (a dark 16-bit PNG stays dark): I;16* (16-bit PNG or TIFF) and I (32-bit integer, read as 0..65535,
    which is what 16-bit files give in older Pillow). A float image (F, a float TIFF) is read by its range: up to
    1 as [0, 1], up to 255 as 8-bit, beyond as 16-bit. Transparency (RGBA, LA, PA, a palette with a transparent
    colour) is composited onto `background`: white, the renderer's, for images."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(im).astype(np.float64))
        top = arr.max(initial=0)  # float (F): read by its range, [0, 1] or [0, 255] or 16-bit; integers: 16-bit
        arr = arr * (255.0 if im.mode == "F" and top <= 1 else 1.0 if im.mode == "F" and top <= 255 else 1 / 257.0)
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (*background, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_rgb(path, background=(255, 255, 255)):
    """Opens an image file as 8-bit RGB (to_rgb), upright: the EXIF orientation a phone camera records is applied
    (a photo taken in portrait is stored sideways with a tag that says so). A file that cannot be decoded,
    missing or cut short included, raises BrokenImageError naming it; the folder datasets below skip such
    files. Running out of memory is not a broken file: MemoryError, naming the file and its size."""
    size = None
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()  # decode now: a truncated file fails here, not later in a transform
            return to_rgb(ImageOps.exif_transpose(im), background)
    except MemoryError:
        where = f" ({size[0]} x {size[1]} pixels)" if size else ""
        raise MemoryError(f"out of memory while decoding {path}{where}; free memory or downscale the image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError or ValueError depending on the damage
        raise BrokenImageError(f"could not read image {path}: {e}. Replace or delete the file.") from e


def load_or_skip(path):
    """load_rgb, or None with one BrokenImageWarning per file (and process) when the file is broken.
    A long run never stops on one bad file; train.py counts the skips per epoch."""
    try:
        return load_rgb(path)
    except BrokenImageError as e:
        if path not in _warned_paths:
            _warned_paths.add(path)
            warnings.warn(f"skipping it: {e}", BrokenImageWarning, stacklevel=2)
        return None


VAL_FRACTION = 0.1  # a folder without train/ and val/: the share of its files held out for validation


def held_out(relpath, fraction):
    """True when the file at relpath (relative to its dataset's root) belongs to the held-out validation split.
    The test is a hash of the path itself, compared with fraction: the same on every machine, run and process,
    and a file's split never changes when files are added to or removed from the folder."""
    digest = hashlib.sha256(os.fsencode(relpath.replace(os.sep, "/"))).digest()  # a non-UTF-8 name: its bytes
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _split_files(root, paths, split, val_fraction):
    """paths (under root) of one split: all of them (split None), or those held_out picks (val) or not (train)."""
    if split is None:
        return paths
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
    return [p for p in paths if held_out(os.path.relpath(p, root), val_fraction) == (split == "val")]


def _check_split(root, samples, total, split, val_fraction):
    if not samples:
        where = "falls in the val split" if split == "val" else "is left for training after holding out"
        change = "raise" if split == "val" else "lower"
        raise ValueError(f"no file of the {total} images under {root} {where} --val-fraction {val_fraction:g}; {change} "
                         f"--val-fraction, add images, or give {root}/train and {root}/val")


class ImageFolderDataset(Dataset):
    """root/<class>/**/<image>: classes are the sorted subfolder names, labels their indices.
    split "train" / "val" keeps the files that held_out(path relative to root, val_fraction) leaves in / takes out
    (a folder without its own train/ and val/); None keeps all."""

    def __init__(self, root, transform=None, split=None, val_fraction=VAL_FRACTION):
        _check_dir(root)
        self.root, self.transform = root, transform
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.num_classes = len(self.classes)
        per_class = [list_images(os.path.join(root, name)) for name in self.classes]
        if not any(per_class):
            raise _no_images(os.path.join(root, "<class>"))
        self.samples = []  # [(path, label)]
        for label, (name, paths) in enumerate(zip(self.classes, per_class)):
            if not paths:
                raise FileNotFoundError(f"class folder {os.path.join(root, name)} has no images; add some or remove it")
            kept = _split_files(root, paths, split, val_fraction)
            if split == "train" and not kept:
                raise ValueError(f"every image of class folder {os.path.join(root, name)} falls in the held-out val "
                                 f"split (--val-fraction {val_fraction:g}); add images or give {root}/train and {root}/val")
            self.samples += [(p, label) for p in kept]
        _check_split(root, self.samples, sum(map(len, per_class)), split, val_fraction)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = load_or_skip(path)
        return None if img is None else (_apply(self.transform, img), label)  # None: see collate_skip_broken


class FlatFolderDataset(Dataset):
    """Every image under root (recursive), unlabelled: label -1, num_classes None. split as ImageFolderDataset."""

    def __init__(self, root, transform=None, split=None, val_fraction=VAL_FRACTION):
        _check_dir(root)
        self.root, self.transform = root, transform
        paths = list_images(root)
        if not paths:
            raise _no_images(root)
        self.samples = _split_files(root, paths, split, val_fraction)
        _check_split(root, self.samples, len(paths), split, val_fraction)
        self.classes, self.num_classes = [], None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img = load_or_skip(self.samples[i])
        return None if img is None else (_apply(self.transform, img), -1)


def folder_split(data, val_fraction=VAL_FRACTION):
    """How a folder is split into train and val: (train root, val root, held out), held out True when both
    splits come from one folder by held_out. data/train and data/val when both exist; data/train alone is held
    out from; data itself otherwise (its subfolders are classes, or its images one unlabelled set)."""
    _check_dir(data)
    has_train, has_val = (os.path.isdir(os.path.join(data, s)) for s in ("train", "val"))
    if has_val and not has_train:
        raise ValueError(f"{data} has a val/ folder but no train/; give both, or neither (then "
                         f"--val-fraction {val_fraction:g} of the files are held out)")
    if has_train and has_val:
        return os.path.join(data, "train"), os.path.join(data, "val"), False
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1) for {data}, which has no train/ and val/ folders to "
                         f"split it, got {val_fraction:g}")
    root = os.path.join(data, "train") if has_train else data
    return root, root, True


def split_note(data, val_fraction=VAL_FRACTION):
    """One line for a script's start-up: where train and val come from."""
    if data == "synthetic":
        return "split: synthetic train and val scenes drawn from different seeds"
    train_root, val_root, held = folder_split(data, val_fraction)
    if not held:
        return f"split: {train_root} for training, {val_root} for validation"
    return (f"split: {train_root} has no train/ and val/ folders, so {val_fraction:.0%} of its files are held out for "
            "validation, picked by a hash of each file's relative path (the same on every machine and run; "
            "--val-fraction)")


def build_dataset(data, img_size, train=True, n_synthetic=None, seed=0, augment=None, val_fraction=VAL_FRACTION):
    """data = "synthetic" or a folder. Folders (folder_split): data/{train,val} when both exist, else val is the
    val_fraction of the files held_out picks and train the rest, so no file is in both. Image files directly
    in the split's root make it a flat folder, otherwise its subfolders are classes.
    n_synthetic defaults to 2048 train / 512 val scenes; the val scenes use seed + VAL_SEED_OFFSET.
    augment (default: train) picks train_transform over the evaluation view; probe.py reads the train split
    without it, to extract each image's features once."""
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    augment = train if augment is None else augment
    if data == "synthetic":
        n = n_synthetic or (2048 if train else 512)
        # Scenes are generated at img_size, so evaluation needs no resize or crop (which would also move
        # the images off their masks and boundaries).
        transform = train_transform(img_size) if augment else None
        return SyntheticScenes(n, img_size, seed=seed + (0 if train else VAL_SEED_OFFSET), transform=transform)
    transform = train_transform(img_size) if augment else eval_transform(img_size)
    train_root, val_root, held = folder_split(data, val_fraction)
    root = train_root if train else val_root
    split = ("train" if train else "val") if held else None
    loose = any(_is_image(f) for f in os.listdir(root))
    dataset = FlatFolderDataset if loose else ImageFolderDataset
    return dataset(root, transform, split=split, val_fraction=val_fraction)


def labelled_splits(data, img_size, n_train=None, n_val=None, seed=0, augment=None, val_fraction=VAL_FRACTION):
    """(train_set, val_set, classes) of a labelled dataset, for probe.py and finetune.py: build_dataset's train
    and val splits (n_train / n_val synthetic scenes; augment as build_dataset, for the train split; a folder
    without train/ and val/ is split by held_out) and their class names. Raises ValueError when a split has no
    class folders, the two splits' classes differ, or a file is in both (train/ and val/ linking to one folder)."""
    train_set = build_dataset(data, img_size, train=True, n_synthetic=n_train, seed=seed, augment=augment,
                              val_fraction=val_fraction)
    val_set = build_dataset(data, img_size, train=False, n_synthetic=n_val, seed=seed, val_fraction=val_fraction)
    for split in (train_set, val_set):
        if not split.num_classes:
            raise ValueError(f"{split.root} has no class folders, so no labels to learn or score; "
                             f"use root/<class>/<image> or root/{{train,val}}/<class>/<image>")
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise ValueError(f"train and val classes of {data} differ (only in train: {only_train}, only in val: "
                         f"{only_val}); both need the same root/{{train,val}}/<class> folders")
    if train_set.num_classes < 2:
        raise ValueError(f"{data} has one class ({train_set.classes[0]}): every answer would be right; a probe or a "
                         "fine-tuning needs two class folders or more")
    if data != "synthetic":
        both = same_files([p for p, _ in train_set.samples], [p for p, _ in val_set.samples])
        if both:
            raise ValueError(f"{len(both)} image files of {data} are in both train and val (e.g. {both[0]}), by path "
                             "or by content; scores on them would measure memory, not generalisation")
    return train_set, val_set, train_set.classes


def same_files(a, b):
    """Files of list b that are also in a: the same file (real path) or a byte-identical copy. Only files whose
    size some file of a shares are hashed, so a healthy split costs a stat per file."""
    real = {p: os.path.realpath(p) for p in (*a, *b)}
    real_a = {real[p] for p in a}
    sizes = {}
    for p in a:
        sizes.setdefault(os.path.getsize(p), []).append(p)
    digests = {}  # each file read at most once

    def digest(p):
        if p not in digests:
            with open(p, "rb") as f:
                digests[p] = hashlib.sha256(f.read()).digest()
        return digests[p]

    found = []
    for p in b:
        twins = [q for q in sizes.get(os.path.getsize(p), []) if real[q] != real[p]]
        if real[p] in real_a or (twins and digest(p) in {digest(q) for q in twins}):
            found.append(p)
    return found


def check_readable(dataset, what):
    """ValueError when no item of dataset loads (every file unreadable): found before any training starts.
    Stops at the first readable item, so it costs one image on a healthy folder."""
    if not any(dataset[i] is not None for i in range(len(dataset))):
        raise ValueError(f"none of the {len(dataset)} files of {what} ({getattr(dataset, 'root', '?')}) could be "
                         "read as an image (warnings above name them)")


# ----------------------------------------------------------------------------- loaders: shards, resume, skips

class ResumableSampler(DistributedSampler):
    """This process's share of a random permutation that depends only on (seed, epoch): torch's
    DistributedSampler, so rank r of W reads items perm[r], perm[r + W], ... and the W shards of one step
    together hold the items a single process with a W times larger batch would read.
    set_epoch(epoch, start) also skips the first `start` items of the share, to resume mid-epoch exactly."""

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), getattr(self, "start", 0), None)

    def __len__(self):
        return self.num_samples - getattr(self, "start", 0)


class EpochKeys(Sampler):
    """(epoch, index) for every index a ResumableSampler yields: the key SeededItems seeds item `index` from.
    The epoch travels with the key because worker processes hold their own copy of the dataset, which the
    main process's set_epoch never reaches."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


def item_seed(seed, epoch, index):
    """The 64-bit seed of item `index`'s random draws in `epoch`. numpy's SeedSequence hashes the three numbers,
    so different (seed, epoch, index) get unrelated seeds (a sum such as seed + index would give --seed 1's
    item 0 the crop of --seed 0's item 1)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1, np.uint64)[0])


class SeededItems(Dataset):
    """dataset[index] for the key (epoch, index), its transform drawing from torch's global RNG seeded with
    item_seed(seed, epoch, index), and the caller's RNG state restored afterwards. An item's crop and flip then
    depend on (seed, epoch, index) only: the same with 0 or 8 workers, in one process or as a DDP shard, and
    after --resume. (DataLoader's per-worker seeding is not enough: a worker's stream depends on which items it
    read before, and it is not saved in a checkpoint.)"""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, restored on exit
            # default_generator, not torch.manual_seed, which would also reseed the GPU's (the masks') generator
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, index))
            return self.dataset[index]


def collate_skip_broken(batch):
    """default_collate over the items that loaded: broken image files (None, see load_or_skip) are dropped,
    so a batch can come out smaller than the batch size; None when no item in it loaded."""
    good = [item for item in batch if item is not None]
    return default_collate(good) if good else None


def make_loader(dataset, batch_size, rank=0, world_size=1, seed=0, shuffle=True, workers=0, pin_memory=False):
    """(DataLoader, ResumableSampler) reading this process's shard of `dataset`, batch_size items per step
    per process, incomplete last batches dropped. Call sampler.set_epoch(epoch) before every epoch.
    Single-process runs (world_size 1) use the same sampler, so their order depends on (seed, epoch) only, and
    each item's augmentation on (seed, epoch, index) only (SeededItems), whatever the number of workers.
    Augmentation leaves the caller's global RNG as it was, and the loader's own generator seeds the worker
    processes, so the masks of an exactly resumed run (train.py --resume) do not shift by a draw."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(SeededItems(dataset, seed), batch_size=batch_size, sampler=EpochKeys(sampler),
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                        collate_fn=collate_skip_broken, generator=torch.Generator().manual_seed(seed + rank),
                        worker_init_fn=leave_process_group)
    return loader, sampler


def leave_process_group(worker_id):
    """In a loader worker: a SIGTERM or SIGINT sent to the whole process group (a scheduler, Ctrl-C) is the main
    process's to handle (it finishes its step, saves, then ends its workers), not a reason for a worker to die
    mid-batch. So the worker leaves the group (and ignores SIGINT); the loader's own shutdown still ends it."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
