"""Tests for data.py: synthetic scenes and their ground truth, PIL transforms, image folders, build_dataset.

Run:  pytest -q tests/test_data.py
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import scenes  # noqa: E402


def _neighbours_differ(a):
    """[H, W] bool: True where a pixel has a 4-neighbour (inside the image) with a different value."""
    d = np.zeros(a.shape, bool)
    d[:, :-1] |= a[:, :-1] != a[:, 1:]
    d[:, 1:] |= a[:, 1:] != a[:, :-1]
    d[:-1, :] |= a[:-1, :] != a[1:, :]
    d[1:, :] |= a[1:, :] != a[:-1, :]
    return d


def _dilate(b):
    """4-neighbour dilation of a [H, W] bool map."""
    out = b.copy()
    out[:, :-1] |= b[:, 1:]
    out[:, 1:] |= b[:, :-1]
    out[:-1, :] |= b[1:, :]
    out[1:, :] |= b[:-1, :]
    return out


def _write_png(path, colour, size=(10, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------- synthetic scenes

def test_scene_is_the_same_across_instances_and_access_order():
    a, b = data.SyntheticScenes(50, seed=3), data.SyntheticScenes(50, seed=3)
    first = [a.scene(i) for i in (7, 21, 42)]
    later = [b.scene(i) for i in (42, 21, 7)][::-1]  # another instance, reverse order
    for x, y in zip(first, later):
        for key in ("image", "mask", "boundary", "layers"):
            assert torch.equal(x[key], y[key]), key
        assert x["label"] == y["label"]
    assert torch.equal(a[7][0], a[7][0])
    assert not torch.equal(a.scene(7)["image"], data.SyntheticScenes(50, seed=4).scene(7)["image"])
    assert not torch.equal(a.scene(7)["image"], a.scene(8)["image"])


def test_getitem_without_transform_equals_scene_image():
    ds = data.SyntheticScenes(10)
    for i in range(10):
        img, label = ds[i]
        sc = ds.scene(i)
        assert torch.equal(img, sc["image"]) and label == sc["label"]


def test_dataloader_workers_give_the_same_items():
    ds = data.SyntheticScenes(8)
    imgs, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)))
    assert torch.equal(imgs, torch.stack([ds[i][0] for i in range(8)]))
    assert labels.tolist() == [ds[i][1] for i in range(8)]


@pytest.mark.parametrize("img_size", [32, 48])
def test_scene_shapes_dtypes_and_ranges(img_size):
    ds = data.SyntheticScenes(5, img_size=img_size)
    sc = ds.scene(3)
    assert sc["image"].shape == (3, img_size, img_size) and sc["image"].dtype == torch.float32
    assert 0.0 <= sc["image"].min() and sc["image"].max() <= 1.0
    assert sc["image"].std() > 0.05  # a scene, not a flat colour
    for key in ("mask", "boundary"):
        assert sc[key].shape == (img_size, img_size) and sc[key].dtype == torch.bool
    assert sc["layers"].shape == (img_size, img_size) and sc["layers"].dtype == torch.int64
    assert isinstance(sc["label"], int) and sc["label"] == 3
    img, label = ds[3]
    assert img.shape == (3, img_size, img_size) and label == 3


def test_labels_are_balanced_over_all_classes():
    ds = data.SyntheticScenes(200)
    counts = np.bincount([ds[i][1] for i in range(200)], minlength=10)
    assert counts.tolist() == [20] * 10
    assert ds.num_classes == 10 and len(ds.classes) == 10 and len(set(ds.classes)) == 10


def test_foreground_mask_is_the_top_layer_near_the_centre():
    ds = data.SyntheticScenes(200)
    for i in range(200):
        sc = ds.scene(i)
        mask, layers = sc["mask"].numpy(), sc["layers"].numpy()
        assert mask.sum() >= 0.03 * mask.size, f"scene {i}: foreground covers only {mask.sum()} px"
        assert (mask == (layers == layers.max())).all()  # painted last, so its id is the largest visible one
        ys, xs = np.nonzero(mask)
        centre = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / 2 / 32
        assert ((centre > 0.15) & (centre < 0.85)).all(), f"scene {i}: foreground centred at {centre}"


def test_foreground_is_the_one_big_shape_and_occluders_are_flat():
    """The class must be what the picture is about: the foreground covers at least 12 % of the image and more
    than twice the visible pixels of any occluder, and occluders carry no texture (that is a class cue)."""
    ds = data.SyntheticScenes(200)
    for i in range(200):
        sc = ds.scene(i)
        layers, img = sc["layers"].numpy(), sc["image"].permute(1, 2, 0).numpy()
        fg = layers.max()
        counts = np.bincount(layers.ravel(), minlength=fg + 1)  # pixels per visible layer
        assert counts[fg] >= 0.12 * layers.size, f"scene {i}: foreground covers only {counts[fg]} px"
        assert counts[1:fg].max(initial=0) < 0.5 * counts[fg], f"scene {i}: an occluder rivals the foreground"
        for k in range(1, fg):
            region = layers == k
            interior = region & ~_dilate(_dilate(~region))
            if interior.sum() >= 10:  # one colour (stripes would split it in two), up to a later shape's corner halo
                colours = img[interior]
                same = (np.abs(colours - np.median(colours, 0)).max(1) <= 1.5 / 255).mean()
                assert same >= 0.8, f"scene {i}: occluder {k} is textured ({same:.2f} of it one colour)"


def test_flat_foreground_pixels_have_one_colour_that_differs_from_the_surround():
    ds = data.SyntheticScenes(50)
    checked = 0
    for i in range(50):
        sc = ds.scene(i)
        mask = sc["mask"].numpy()
        interior = mask & ~_dilate(_dilate(~mask))  # two pixels away from the anti-aliased edge
        if data.TEXTURES[sc["label"] // 5] != "flat" or not interior.any():
            continue
        checked += 1
        img = sc["image"].permute(1, 2, 0).numpy()
        colours = img[interior]
        assert np.abs(colours - colours[0]).max() <= 1.5 / 255, f"scene {i}: foreground is not one colour"
        around = _dilate(_dilate(mask)) & ~mask
        assert np.abs(img[around].mean(0) - colours[0]).sum() > 0.15, f"scene {i}: foreground blends in"
    assert checked >= 20


def test_boundary_lies_on_layer_changes_and_encloses_the_mask():
    ds = data.SyntheticScenes(100)
    for i in range(100):
        sc = ds.scene(i)
        boundary, layers, mask = sc["boundary"].numpy(), sc["layers"].numpy(), sc["mask"].numpy()
        assert boundary.any()
        # Every boundary pixel separates two visible shapes ...
        assert _neighbours_differ(layers)[boundary].all(), f"scene {i}: boundary pixel inside one region"
        # ... and every border pixel of the foreground mask is on or next to the boundary.
        border = mask & _neighbours_differ(mask)
        assert _dilate(boundary)[border].all(), f"scene {i}: mask border without boundary"


def test_class_is_readable_from_the_visible_foreground():
    """Nearest-centroid on a rotation-invariant shape descriptor of the mask (radial histogram) plus the
    colour spread inside it separates the 10 classes far above chance (0.1)."""
    ds = data.SyntheticScenes(300)
    feats, labels = [], []
    for i in range(300):
        sc = ds.scene(i)
        mask = sc["mask"].numpy()
        ys, xs = np.nonzero(mask)
        d = np.hypot(xs - xs.mean(), ys - ys.mean())
        radial = np.histogram(d / d.max(), bins=6, range=(0, 1))[0] / len(d)
        interior = mask & ~_neighbours_differ(mask)
        grey = sc["image"].mean(0).numpy()[interior]
        spread = grey.std() if len(grey) > 1 else 0.0
        feats.append(np.append(radial, 4 * spread))
        labels.append(sc["label"])
    feats, labels = np.array(feats), np.array(labels)
    centroids = np.stack([feats[:200][labels[:200] == c].mean(0) for c in range(10)])
    pred = np.linalg.norm(feats[200:, None] - centroids[None], axis=2).argmin(1)
    accuracy = (pred == labels[200:]).mean()
    assert accuracy > 0.8, f"nearest-centroid accuracy {accuracy:.2f}"


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="num_classes must be in 1..15"):
        data.SyntheticScenes(10, num_classes=16)
    with pytest.raises(ValueError, match="img_size >= 8"):
        data.SyntheticScenes(10, img_size=4)
    with pytest.raises(IndexError, match="out of range"):
        data.SyntheticScenes(10)[10]


def test_fifteen_classes_include_checker_textures():
    ds = data.SyntheticScenes(15, num_classes=15)
    assert ds.classes[10:] == [f"{s}-checker" for s in data.SHAPES]
    assert ds.scene(14)["label"] == 14


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("in_size", [(32, 32), (100, 50), (50, 100), (500, 20), (7, 300)])
@pytest.mark.parametrize("out_size", [16, (24, 12)])
def test_random_resized_crop_output_size(in_size, out_size):
    img = Image.new("RGB", in_size, (10, 20, 30))
    out = data.RandomResizedCrop(out_size)(img)
    h, w = (out_size, out_size) if isinstance(out_size, int) else out_size
    assert out.size == (w, h)


def test_random_resized_crop_boxes_respect_scale_ratio_and_image():
    crop = data.RandomResizedCrop(32, scale=(0.2, 1.0))
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = crop.get_params(120, 90)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        assert 0.2 - 0.03 <= h * w / (120 * 90) <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    torch.manual_seed(1)
    a = crop.get_params(120, 90)
    torch.manual_seed(1)
    assert crop.get_params(120, 90) == a


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # 500 x 20: no box of area >= 20% with ratio in [3/4, 4/3] fits, so torchvision's fallback applies.
    assert data.RandomResizedCrop(16).get_params(500, 20) == (0, (500 - 27) // 2, 20, 27)


def test_horizontal_flip_mirrors_with_p1_and_keeps_with_p0():
    arr = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert (np.asarray(data.RandomHorizontalFlip(p=1.0)(img)) == arr[:, ::-1]).all()
    assert (np.asarray(data.RandomHorizontalFlip(p=0.0)(img)) == arr).all()


@pytest.mark.parametrize("in_size", [(32, 32), (100, 60), (60, 100), (500, 375)])
def test_eval_transform_gives_exact_size(in_size):
    x = data.eval_transform(32)(Image.new("RGB", in_size, (200, 100, 0)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 16, 16], torch.tensor([200, 100, 0]) / 255.0, atol=1e-6)


def test_resize_sets_the_shorter_side_and_center_crop_is_centred():
    assert data.Resize(36)(Image.new("RGB", (100, 60))).size == (60, 36)
    assert data.Resize(36)(Image.new("RGB", (60, 100))).size == (36, 60)
    arr = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    out = np.asarray(data.CenterCrop(4)(Image.fromarray(arr)))
    assert (out == arr[1:5, 2:6]).all()
    with pytest.raises(ValueError, match="Resize first"):
        data.CenterCrop(10)(Image.fromarray(arr))


def test_train_transform_output_is_a_unit_range_tensor():
    torch.manual_seed(0)
    x = data.train_transform(24)(Image.new("RGB", (64, 48), (255, 0, 0)))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_to_tensor_layout_and_range():
    arr = np.zeros((3, 4, 3), np.uint8)
    arr[1, 2] = (255, 0, 128)
    x = data.to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 3, 4) and x.dtype == torch.float32
    assert torch.allclose(x[:, 1, 2], torch.tensor([1.0, 0.0, 128 / 255]))
    assert x.sum() == pytest.approx(1 + 128 / 255)
    grey = data.to_tensor(Image.new("L", (5, 5), 51))
    assert grey.shape == (3, 5, 5) and torch.allclose(grey, torch.full((3, 5, 5), 0.2))


# ----------------------------------------------------------------------------- image folders

def test_image_folder_labels_and_count(tmp_path):
    for k in range(3):
        _write_png(str(tmp_path / "cat" / f"c{k}.png"), (255, 0, 0))
    _write_png(str(tmp_path / "dog" / "d0.PNG"), (0, 0, 255))
    _write_png(str(tmp_path / "dog" / "nested" / "d1.png"), (0, 0, 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = data.ImageFolderDataset(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 5
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1]
    img, _ = ds[4]
    assert img.shape == (3, 8, 10) and torch.allclose(img[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    sized = data.ImageFolderDataset(str(tmp_path), data.eval_transform(16))
    assert sized[0][0].shape == (3, 16, 16)


def test_flat_folder_finds_images_recursively_with_label_minus_one(tmp_path):
    _write_png(str(tmp_path / "a.png"), (1, 2, 3))
    _write_png(str(tmp_path / "sub" / "b.jpg"), (4, 5, 6))
    ds = data.FlatFolderDataset(str(tmp_path))
    assert len(ds) == 2 and ds.num_classes is None
    assert all(ds[i][1] == -1 and ds[i][0].shape == (3, 8, 10) for i in range(2))


def test_missing_folder_error_names_it(tmp_path):
    missing = str(tmp_path / "nope")
    for cls in (data.ImageFolderDataset, data.FlatFolderDataset):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            cls(missing)
        assert missing in str(err.value)


def test_empty_folder_error_lists_the_extensions(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    for cls in (data.ImageFolderDataset, data.FlatFolderDataset):
        with pytest.raises(FileNotFoundError, match="no images found under") as err:
            cls(str(tmp_path))
        assert str(tmp_path) in str(err.value) and ".jpg" in str(err.value)


def test_empty_class_folder_is_an_error(tmp_path):
    _write_png(str(tmp_path / "a" / "x.png"), (0, 0, 0))
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="has no images") as err:
        data.ImageFolderDataset(str(tmp_path))
    assert str(tmp_path / "b") in str(err.value)


def test_corrupt_image_error_names_the_file_and_the_dataset_skips_it(tmp_path):
    _write_png(str(tmp_path / "ok" / "good.png"), (0, 0, 0))
    bad = tmp_path / "ok" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(data.BrokenImageError, match="could not read image") as err:
        data.load_rgb(str(bad))
    assert str(bad) in str(err.value)
    ds = data.ImageFolderDataset(str(tmp_path))
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.warns(data.BrokenImageWarning, match="x.jpg"):
        assert ds[index] is None  # skipped (issue 10); tests/test_broken_data.py covers the rest


# ----------------------------------------------------------------------------- build_dataset

def test_build_dataset_synthetic_splits_differ():
    train = data.build_dataset("synthetic", 32, train=True)
    val = data.build_dataset("synthetic", 32, train=False)
    assert isinstance(train, data.SyntheticScenes) and len(train) == 2048 and len(val) == 512
    assert train.num_classes == val.num_classes == 10
    assert not torch.equal(train.scene(0)["image"], val.scene(0)["image"])
    torch.manual_seed(0)
    x, label = train[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and label == 0
    assert torch.equal(val[0][0], val.scene(0)["image"])  # eval scenes are not cropped: masks stay aligned
    assert len(data.build_dataset("synthetic", 32, n_synthetic=64)) == 64


def test_build_dataset_folders(tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            _write_png(str(tmp_path / "split" / split / name / "0.png"), (9, 9, 9), size=(40, 30))
    for i in range(10):  # no train/ and val/: data.held_out keeps about 1 in 10 files for validation
        _write_png(str(tmp_path / "flat" / f"{i}.png"), (9, 9, 9))
        _write_png(str(tmp_path / "classes" / "x" / f"{i}.png"), (9, 9, 9))
    train = data.build_dataset(str(tmp_path / "split"), 16, train=True)
    val = data.build_dataset(str(tmp_path / "split"), 16, train=False)
    assert isinstance(train, data.ImageFolderDataset) and train.classes == ["a", "b", "c"]
    assert train.root.endswith("train") and val.root.endswith("val")
    assert val[0][0].shape == (3, 16, 16)
    assert isinstance(data.build_dataset(str(tmp_path / "flat"), 16), data.FlatFolderDataset)
    assert isinstance(data.build_dataset(str(tmp_path / "classes"), 16), data.ImageFolderDataset)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset(str(tmp_path / "missing"), 16)


@pytest.mark.parametrize("bad", [0, -32, 32.0])
def test_build_dataset_rejects_bad_image_size(bad):
    with pytest.raises(ValueError, match="img_size must be a positive integer"):
        data.build_dataset("synthetic", bad)


def test_scene_grid_has_three_panels_per_scene():
    grid = scenes.scene_grid(data.SyntheticScenes(8), n=8, cols=4, zoom=2)
    assert grid.size == (4 * (3 * 32 + 6) * 2, 2 * 34 * 2)
