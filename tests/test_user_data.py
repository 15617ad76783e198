"""A user's own folders and photos: every split is held out (no image scored that was trained on), phone photos
come upright, 16-bit images keep their brightness, and a folder that cannot be used is one line, not a traceback.

    held_out(path, f) = sha256(path relative to the root)[:8] / 2^64 < f     the same on every machine and run

Try it: python -m pytest -q tests/test_user_data.py
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_probe import save_ckpt, small_config

import data
import finetune
import probe
import train
from cli import cli_error


def noise_folder(root, classes=2, per_class=30, size=16, seed=0):
    """root/<class>/<i>.png of pure noise: nothing to learn, so any score above chance on held-out images is leakage."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def paths(dataset):
    return {os.path.realpath(s if isinstance(s, str) else s[0]) for s in dataset.samples}


# ----------------------------------------------------------------------------- held-out splits


def test_held_out_takes_the_fraction_asked_and_depends_on_the_relative_path_only():
    names = [f"class{i % 7}/img_{i}.jpg" for i in range(4000)]
    share = np.mean([data.held_out(n, 0.1) for n in names])
    assert abs(share - 0.1) < 0.02  # binomial: std 0.005
    # The same answer for the same relative path whatever the separator; a larger fraction only adds files.
    assert [data.held_out(n, 0.1) for n in names] == [data.held_out(n.replace("/", os.sep), 0.1) for n in names]
    assert all(data.held_out(n, 0.3) for n in names if data.held_out(n, 0.1))


def test_a_class_folder_without_a_split_is_split_with_no_image_in_both(tmp_path):
    root = noise_folder(tmp_path / "noise")
    train_set, val_set, classes = data.labelled_splits(root, 16, augment=False)
    assert classes == ["class0", "class1"]
    assert not paths(train_set) & paths(val_set)
    assert len(train_set) + len(val_set) == 60 and 1 <= len(val_set) <= 15
    # Which files are held out depends on their relative paths only: a copy of the folder elsewhere splits alike.
    os.rename(root, tmp_path / "moved")
    moved_val = data.build_dataset(str(tmp_path / "moved"), 16, train=False)
    assert [os.path.relpath(p, tmp_path / "moved") for p, _ in moved_val.samples] == \
        [os.path.relpath(p, root) for p, _ in val_set.samples]


def test_probe_on_a_class_folder_of_noise_scores_held_out_images_near_chance(tmp_path, capsys):
    # On main at c0c3c2f this folder gave "60 train / 60 val images" and 100.0 (it scored its own training images).
    root = noise_folder(tmp_path / "noise", per_class=40)
    save_ckpt(tmp_path / "checkpoint.pt", small_config())
    result = probe.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--data", root, "--epochs", "0", "--knn", "1",
                         "--val-fraction", "0.25", "--out", str(tmp_path / "probe.json")])
    out = capsys.readouterr().out
    assert "25% of its files are held out for validation, picked by a hash of each file's relative path" in out
    assert result["num_train"] + result["num_val"] == 80 and result["num_val"] < 40
    assert result["knn"]["top1"] < 80  # 1-NN on its own training images would be 100.0


def test_a_flat_folder_gives_train_py_validation_images_it_does_not_train_on(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 6, 0, 0)).save(folder / f"{i:02d}.png")
    train_set = data.build_dataset(str(folder), 16, train=True)
    val_set = data.build_dataset(str(folder), 16, train=False, val_fraction=0.1)
    assert isinstance(val_set, data.FlatFolderDataset) and len(val_set) >= 1
    assert not paths(train_set) & paths(val_set) and len(paths(train_set) | paths(val_set)) == 40


def test_a_lone_train_folder_is_split_and_a_lone_val_folder_is_refused(tmp_path):
    noise_folder(tmp_path / "only_train" / "train")
    train_set = data.build_dataset(str(tmp_path / "only_train"), 16, train=True)
    val_set = data.build_dataset(str(tmp_path / "only_train"), 16, train=False)
    assert train_set.classes == ["class0", "class1"]  # not one class called "train"
    assert not paths(train_set) & paths(val_set) and len(train_set) + len(val_set) == 60
    noise_folder(tmp_path / "only_val" / "val")
    with pytest.raises(ValueError, match="has a val/ folder but no train/"):
        data.build_dataset(str(tmp_path / "only_val"), 16)


def test_train_and_val_that_are_one_folder_are_refused(tmp_path):
    root = tmp_path / "linked"
    noise_folder(root / "train")
    os.symlink(root / "train", root / "val")
    with pytest.raises(ValueError, match="60 image files of .* are in both train and val"):
        data.labelled_splits(str(root), 16)


def test_a_folder_too_small_for_the_fraction_says_what_to_do(tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20)).save(folder / name)
    split = [data.held_out(n, 0.01) for n in ("a.png", "b.png")]
    assert split == [False, False]  # so the val split is empty
    with pytest.raises(ValueError, match="falls in the val split --val-fraction 0.01; raise --val-fraction, add images, or give"):
        data.build_dataset(str(folder), 16, train=False, val_fraction=0.01)
    msg = cli_error(capsys, train.main, ["--data", str(folder), "--val-fraction", "1.5"])
    assert msg == "--val-fraction must be in (0, 1), got 1.5"


# ----------------------------------------------------------------------------- photos: EXIF, 16 bits, memory


def test_a_phone_photo_with_exif_orientation_is_read_upright(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored sideways: 40 wide, 20 high, left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation 6: the camera was turned, show the stored image rotated 90 degrees clockwise
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = data.load_rgb(tmp_path / "phone.jpg")
    assert img.size == (20, 40)  # (width, height): upright, taller than wide
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top, blue below


def test_a_dark_16_bit_png_stays_dark():
    # Values 0..200 of 65535: nearly black. Deciding by the image's own maximum read it as 8-bit (200 = bright).
    arr = (np.arange(64 * 64).reshape(64, 64) % 201).astype(np.uint16)
    rgb = np.asarray(data.to_rgb(Image.fromarray(arr)))
    assert rgb.max() == round(200 / 257) == 1
    full = np.asarray(data.to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16))))
    assert full.min() == 255


def test_running_out_of_memory_is_not_called_a_broken_file(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")

    def no_memory(self):
        raise MemoryError()

    monkeypatch.setattr(Image.Image, "load", no_memory)
    with pytest.raises(MemoryError, match=r"out of memory while decoding .*big.png \(30 x 20 pixels\)") as err:
        data.load_rgb(tmp_path / "big.png")
    assert "Replace or delete" not in str(err.value)


# ----------------------------------------------------------------------------- one line, not a traceback


def unreadable_val_folder(root):
    """root/{train,val}/<class>/: readable training images, a validation split of broken files only."""
    noise_folder(root / "train")
    for c in ("class0", "class1"):
        os.makedirs(root / "val" / c)
        for i in range(3):
            (root / "val" / c / f"{i}.png").write_bytes(b"not an image")
    return str(root)


def test_probe_and_finetune_on_an_unreadable_val_split_stop_in_one_line(tmp_path, capsys):
    root = unreadable_val_folder(tmp_path / "folder")
    save_ckpt(tmp_path / "checkpoint.pt", small_config())
    ckpt = ["--ckpt", str(tmp_path / "checkpoint.pt"), "--data", root]
    with pytest.warns(data.BrokenImageWarning):
        msg = cli_error(capsys, probe.main, ckpt + ["--epochs", "0", "--out", str(tmp_path / "p.json")])
    assert msg == "val features: none of the 6 files could be read as an image (warnings above name them); nothing to probe"
    msg = cli_error(capsys, finetune.main, ckpt + ["--batch-size", "8", "--out", str(tmp_path / "ft")])  # warned once
    assert msg.startswith("none of the 6 files of the validation split")
    assert not os.path.exists(tmp_path / "ft" / "finetune_last.pt")  # stopped before training


def test_finetune_evaluate_with_nothing_readable_is_a_value_error():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no validation image could be read"):
        finetune.evaluate(model, torch.utils.data.DataLoader([None, None], batch_size=1, collate_fn=lambda b: None), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("main", [train.main, probe.main, finetune.main], ids=["train", "probe", "finetune"])
def test_device_cuda_without_a_gpu_is_one_line(main, capsys):
    msg = cli_error(capsys, main, ["--device", "cuda"])
    assert msg.startswith("--device cuda: ") and "use --device cpu" in msg
    assert cli_error(capsys, main, ["--device", "gpu0"]) == \
        "--device 'gpu0' is not a device torch knows; use cpu, cuda or cuda:N"


def test_ecssd_is_read_as_its_archives_unpack(tmp_path):
    import zeroshot_eval

    (tmp_path / "images").mkdir()
    (tmp_path / "ground_truth_mask").mkdir()  # ECSSD's ground_truth_mask.zip; the old reader wanted masks/
    Image.new("RGB", (12, 8), (200, 10, 10)).save(tmp_path / "images" / "0001.jpg")
    mask = np.zeros((8, 12), np.uint8)
    mask[2:6, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "ground_truth_mask" / "0001.png")
    items, name = zeroshot_eval.fg_items(0, 0, False, str(tmp_path), None)
    (img, gt), = items
    assert img.shape == (3, 8, 12) and gt.sum().item() == 24 and name == tmp_path.name


def test_a_classifier_checkpoint_where_a_gmae_is_needed_is_a_checkpoint_error(tmp_path):
    from dataclasses import asdict

    import engine

    cfg = small_config()
    engine.atomic_save({"model": {"encoder.cls_token": torch.zeros(1, 1, cfg.enc_dim), "head.weight": torch.zeros(2, 32)},
                        "config": asdict(cfg), "kind": "finetune"}, str(tmp_path / "finetune_best.pt"))
    with pytest.raises(engine.CheckpointError, match=r"finetune_best.pt holds no decoder \(a finetune.py classifier"):
        engine.load_checkpoint(str(tmp_path / "finetune_best.pt"))


def test_a_checkpoint_records_its_data_and_zeroshot_says_when_it_was_the_synthetic_scenes(tmp_path, capsys):
    import engine
    import zeroshot

    small = ["--img-size", "16", "--patch", "4", "--gaussians", "16", "--n-synthetic", "16", "--batch-size", "8",
             "--val-size", "4", "--epochs", "1", "--max-steps", "1", "--splat", "torch"]
    train.main(small + ["--out", str(tmp_path / "run")])
    ckpt = engine.read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert ckpt["data"] == "synthetic"
    Image.new("RGB", (24, 20), (30, 120, 200)).save(tmp_path / "photo.jpg")
    capsys.readouterr()
    zeroshot.main(["recon", str(tmp_path / "photo.jpg"), "--ckpt", str(tmp_path / "run" / "checkpoint.pt"),
                   "--out", str(tmp_path / "z"), "--splat", "torch", "--device", "cpu"])
    assert "was pretrained on the embedded synthetic scenes" in capsys.readouterr().err


def test_a_rasterizer_that_cannot_build_stops_train_py_in_one_line(tmp_path, capsys, monkeypatch):
    import splat

    def unavailable(*args, **kwargs):
        raise splat.BackendUnavailable("the cpu rasterizer could not be built: no compiler; use --splat torch")

    monkeypatch.setattr(splat, "render", unavailable)
    small = ["--img-size", "16", "--patch", "4", "--gaussians", "16", "--n-synthetic", "16", "--batch-size", "8",
             "--val-size", "4", "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path / "run")]
    assert cli_error(capsys, train.main, small) == "the cpu rasterizer could not be built: no compiler; use --splat torch"
