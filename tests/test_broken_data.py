"""Broken and unusual files in image folders (issue 10): odd modes are converted, broken files skipped.

Run:  pytest -q tests/test_broken_data.py
"""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data


def _save(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)
    return path


def write_good_and_odd(folder):
    """Readable images in every mode the loader must convert; returns {name: path}."""
    rgb = Image.new("RGB", (12, 10), (200, 100, 50))
    paths = {
        "rgb": _save(f"{folder}/rgb.png", rgb),
        "grey": _save(f"{folder}/grey.png", Image.new("L", (12, 10), 51)),
        "bilevel": _save(f"{folder}/bilevel.png", Image.new("1", (12, 10), 1)),
        "cmyk": _save(f"{folder}/cmyk.jpg", Image.new("CMYK", (12, 10), (0, 255, 255, 0))),
        "rgba": _save(f"{folder}/rgba.png", Image.new("RGBA", (12, 10), (0, 0, 0, 0))),  # fully transparent
        "palette": _save(f"{folder}/palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
        "grey16": _save(f"{folder}/grey16.png", Image.fromarray(np.full((10, 12), 40000, np.uint16))),
        "tiny": _save(f"{folder}/tiny.png", Image.new("RGB", (1, 1), (0, 255, 0))),
    }
    transparent = Image.new("P", (12, 10), 0)
    transparent.putpalette([0, 0, 0] * 256)
    paths["palette_transparent"] = _save(f"{folder}/palette_t.png", transparent, transparency=0)
    return paths


def write_broken(folder):
    """Files no decoder can read, each broken differently; returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    good_png = _save(f"{folder}/.src.png", Image.fromarray((np.arange(3 * 40 * 40) % 251).astype(np.uint8)
                                                           .reshape(40, 40, 3)))
    good_jpg = _save(f"{folder}/.src.jpg", Image.open(good_png).convert("RGB"), quality=95)
    paths = {name: f"{folder}/{name}" for name in
             ("corrupt.jpg", "empty.png", "truncated.png", "truncated.jpg", "dangling.png", "text.webp")}
    open(paths["corrupt.jpg"], "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    open(paths["empty.png"], "wb").close()
    for src, name in ((good_png, "truncated.png"), (good_jpg, "truncated.jpg")):
        raw = open(src, "rb").read()
        open(paths[name], "wb").write(raw[: len(raw) // 2])
    os.symlink(f"{folder}/does-not-exist.png", paths["dangling.png"])  # listed, but cannot be opened
    open(paths["text.webp"], "w").write("hello")
    return paths


def test_odd_modes_become_8_bit_rgb_with_the_right_colours(tmp_path):
    paths = write_good_and_odd(str(tmp_path))
    px = {name: np.asarray(data.load_rgb(p)) for name, p in paths.items()}
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in px.values())
    assert (px["grey"] == 51).all()
    assert (px["bilevel"] == 255).all()
    assert (np.abs(px["cmyk"].astype(int) - [255, 0, 0]) <= 2).all()  # no cyan, full magenta + yellow = red
    assert (px["rgba"] == 255).all()  # transparent composites onto white, the renderer's background
    assert (px["palette_transparent"] == 255).all()
    assert (px["palette"][0, 0] == px["rgb"][0, 0]).all()
    assert (px["grey16"] == round(40000 / 257)).all()  # 16-bit scaled to 8 bits, not clipped to 255
    assert px["tiny"].shape == (1, 1, 3)
    for transform in (data.train_transform(16), data.eval_transform(16)):
        assert transform(data.load_rgb(paths["tiny"])).shape == (3, 16, 16)  # tiny images are upsampled


def test_every_broken_file_is_skipped_with_one_warning_naming_it(tmp_path):
    good = write_good_and_odd(str(tmp_path / "imgs"))
    broken = write_broken(str(tmp_path / "imgs"))
    ds = data.FlatFolderDataset(str(tmp_path / "imgs"), data.eval_transform(16))
    assert len(ds) == len(good) + len(broken)
    with pytest.warns(data.BrokenImageWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == len(broken) == 6
    assert all(item[0].shape == (3, 16, 16) for item in items if item is not None)
    assert sorted(os.path.basename(str(w.message).split("could not read image ")[1].split(":")[0])
                  for w in record) == sorted(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass warns no more
        assert sum(ds[i] is None for i in range(len(ds))) == 6


def test_loader_drops_broken_items_and_an_all_broken_batch_is_none(tmp_path):
    good = write_good_and_odd(str(tmp_path / "imgs"))
    write_broken(str(tmp_path / "imgs"))
    ds = data.FlatFolderDataset(str(tmp_path / "imgs"), data.eval_transform(16))
    loader, sampler = data.make_loader(ds, batch_size=5, seed=0)
    sampler.set_epoch(0)
    with pytest.warns(data.BrokenImageWarning):
        sizes = [imgs.shape[0] for imgs, labels in loader]
    assert len(sizes) == len(ds) // 5 == 3 and sum(sizes) == 15 - sum(  # 15 drawn, the broken ones dropped
        1 for i in list(sampler)[:15] if ds.samples[i] not in good.values())
    assert data.collate_skip_broken([None, None]) is None


def test_empty_folder_is_still_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found under"):
        data.build_dataset(str(tmp_path / "empty"), 16)


def test_resumable_sampler_shards_one_permutation_and_resumes_mid_epoch():
    ds = list(range(24))
    one = data.ResumableSampler(ds, num_replicas=1, rank=0, seed=3)
    shards = [data.ResumableSampler(ds, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *shards]:
        s.set_epoch(5)
    perm = list(one)
    assert sorted(perm) == ds and list(shards[0]) == perm[0::2] and list(shards[1]) == perm[1::2]
    one.set_epoch(5, start=7)
    assert list(one) == perm[7:] and len(one) == 17
    one.set_epoch(6)
    assert list(one) != perm  # a new order every epoch
    torch.manual_seed(0)
    a = list(one)
    torch.manual_seed(1)
    assert list(one) == a  # the order ignores the global RNG
