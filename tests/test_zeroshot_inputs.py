"""zeroshot.py on a user's own folders, photos and GPU: --device, a photo larger than --max-size renders bounded
and comes back at its own size, output names that never collide, the start-up note on a checkpoint pretrained
on the synthetic scenes, and one-line errors for a fine-tuned checkpoint, numeric flags out of range and broken
evaluation files.

The checkpoints are built here, not trained: a randomly initialised tiny GMAE saved in train.py's layout.

Run:  pytest -q tests/test_zeroshot_inputs.py
"""
import importlib.util
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import engine
import ply
import splat
import zeroshot as Z
from cli import cli_error
from model import GMAE, GMAEConfig

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="optional scipy not installed (requirements-eval.txt)")
CFG = GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                 dec_heads=2, num_gaussians=16)


def save_ckpt(path, **extra):
    """A train.py-layout checkpoint of a random tiny GMAE, plus extra entries (e.g. data="synthetic")."""
    torch.manual_seed(0)
    torch.save({"model": GMAE(CFG).state_dict(), "config": asdict(CFG), **extra}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("zsi") / "photos.pt", data="/data/photos")


def noise_png(path, W, H, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ --device


def test_device_defaults_to_cuda_when_available_and_cuda_without_a_gpu_is_one_line(ckpt, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Z.build_parser().parse_args(["edges", "x.png"]).device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Z.build_parser().parse_args(["edges", "x.png"]).device == "cpu"
    img = noise_png(tmp_path / "a.png", 20, 12)
    message = cli_error(capsys, Z.main, ["edges", img, "--ckpt", ckpt, "--device", "cuda", "--out", str(tmp_path)])
    assert message.startswith("--device cuda: ") and "use --device cpu" in message
    assert cli_error(capsys, Z.main, ["edges", img, "--ckpt", ckpt, "--device", "gpu"]).startswith("--device 'gpu'")


def test_an_explicit_splat_backend_that_cannot_build_is_a_one_line_error(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(splat, "_extensions", {"cuda": RuntimeError("Error building extension: nvcc not found\n"
                                                                     "[1/2] the rest of the compiler's output")})
    img = noise_png(tmp_path / "a.png", 20, 12)
    message = cli_error(capsys, Z.main, ["edges", img, "--ckpt", ckpt, "--splat", "cuda", "--device", "cpu",
                                         "--out", str(tmp_path / "out")])
    assert message == ("splat backend 'cuda' is not available: Error building extension: nvcc not found ... "
                       "(--splat auto falls back to the torch reference)")


def test_the_model_is_loaded_on_the_device_and_the_images_reach_it_there(ckpt, tmp_path, monkeypatch):
    seen = {}
    real = Z.load_gmae

    def spy(path, device):
        seen["load"] = device
        net, ckpt_dict = real(path, device)
        gaussians = net.gaussians

        def record(x, *args):
            seen["images"] = x.device
            return gaussians(x, *args)

        net.gaussians = record
        return net, ckpt_dict

    monkeypatch.setattr(Z, "load_gmae", spy)
    img = noise_png(tmp_path / "a.png", 20, 12)
    assert Z.main(["export", img, "--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert seen == {"load": torch.device("cpu"), "images": torch.device("cpu")}
    assert ply.read_ply(tmp_path / "out" / "a.ply").shape == (16, 14)


# ------------------------------------------------------------------------------------------ --max-size


def test_working_size_keeps_the_aspect_and_bounds_the_longest_side():
    assert Z.working_size(2000, 3000, 512) == (341, 512)  # 2000 x 512 / 3000 = 341.3
    assert Z.working_size(3000, 2000, 512) == (512, 341)
    assert Z.working_size(321, 481, 512) == (321, 481)  # BSDS fits: unchanged
    assert Z.working_size(2000, 3000, 0) == (2000, 3000) and Z.working_size(2000, 3000, None) == (2000, 3000)
    assert Z.working_size(1, 5000, 512) == (1, 512)  # never 0 px
    mask = torch.tensor([[True, False], [False, True]])
    up = Z.resize_map(mask, 4, 6, "nearest-exact")
    assert up.dtype == torch.bool and up.tolist() == [[True] * 3 + [False] * 3] * 2 + [[False] * 3 + [True] * 3] * 2


@pytest.mark.parametrize("command, suffix", [("edges", ".png"), ("figure-ground", "_fg.png"),
                                             ("recon", "_recon.png")])
def test_a_large_photo_renders_at_max_size_and_comes_back_at_its_own_size(ckpt, tmp_path, monkeypatch, command,
                                                                          suffix):
    photo = np.full((2000, 3000, 3), 200, np.uint8)  # H 2000, W 3000: flat, with a dark square (encodes fast)
    photo[600:1400, 1000:2000] = 30
    Image.fromarray(photo).save(tmp_path / "photo.png")
    sizes = []
    render = splat.render

    def spy(g, H, W, *a, **kw):
        sizes.append((H, W))
        assert max(H, W) <= 512, f"a {H} x {W} render: the working size is not bounded"  # before any allocation
        return render(g, H, W, *a, **kw)

    monkeypatch.setattr(splat, "render", spy)
    fast = ["--layers", "2"] if command == "edges" else []
    assert Z.main([command, str(tmp_path / "photo.png"), "--ckpt", ckpt, "--out", str(tmp_path / "out"),
                   "--splat", "torch", "--max-size", "256"] + fast) == 0
    assert sizes and set(sizes) <= {(171, 256), (16, 16)}  # the working size (and recon's model-size PSNR render)
    assert (171, 256) in sizes
    out = Image.open(tmp_path / "out" / ("photo" + suffix))
    assert out.size == ((2 * 3000, 2000) if command == "recon" else (3000, 2000))
    if command == "figure-ground":
        assert set(np.unique(np.asarray(out))) <= {0, 255}  # resized as a mask (nearest), not blurred
        assert Image.open(tmp_path / "out" / "photo_fg_overlay.png").size == (3000, 2000)


def test_an_edge_map_at_max_size_is_the_working_maps_bilinear_enlargement(ckpt, tmp_path):
    net, _ = Z.load_gmae(ckpt)
    img = torch.rand(3, 60, 90, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    bounded = Z.edge_map(net, img, layers=(2,), backend="torch", max_size=30)
    small = torch.nn.functional.interpolate(img[None], size=(20, 30), mode="bilinear", antialias=True)[0]
    torch.manual_seed(0)
    work = Z.edge_map(net, small, layers=(2,), backend="torch")
    assert bounded.shape == (60, 90) and work.shape == (20, 30)
    expected = torch.nn.functional.interpolate(work[None, None], size=(60, 90), mode="bilinear")[0, 0]
    torch.testing.assert_close(bounded, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ output names


def test_same_stems_in_two_subfolders_and_two_extensions_write_separate_files(ckpt, tmp_path):
    photos = tmp_path / "photos"
    for i, rel in enumerate(["a/1.png", "b/1.png", "x.jpg", "x.png", "y.png"]):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        noise_png(photos / rel, 24, 16, seed=i)
    out = tmp_path / "out"
    assert Z.main(["export", str(photos), "--ckpt", ckpt, "--out", str(out)]) == 0
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs if f.endswith(".ply"))
    assert written == ["a/1.ply", "b/1.ply", "x_jpg.ply", "x_png.ply", "y.ply"]
    assert all(os.path.exists(out / name.replace(".ply", "_cameras.json")) for name in written)
    clouds = [ply.read_ply(out / name) for name in written]
    assert all(not torch.equal(clouds[i], clouds[j]) for i in range(5) for j in range(i))  # five images, five clouds


def test_output_names_by_hand_and_a_collision_is_refused_in_one_line(ckpt, tmp_path, capsys):
    assert engine.output_names(["d/1.jpg", "d/sub/1.jpg", "d/x.jpg", "d/x.PNG"], ["1.jpg", "sub/1.jpg", "x.jpg", "x.PNG"]) \
        == ["1", "sub/1", "x_jpg", "x_PNG"]
    assert engine.output_names(["Photo.jpg", "photo.png"], ["Photo.jpg", "photo.png"]) == ["Photo_jpg", "photo_png"]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        noise_png(tmp_path / d / "1.png", 24, 16)
    a, b = str(tmp_path / "a" / "1.png"), str(tmp_path / "b" / "1.png")
    message = cli_error(capsys, Z.main, ["export", a, b, "--ckpt", ckpt, "--out", str(tmp_path / "out")])
    assert message.startswith(f"{a} and {b} would both be written as 1_png") and "different --out" in message
    assert not (tmp_path / "out" / "1.ply").exists()  # refused before anything is written
    assert engine.collect_images([a, a, str(tmp_path / "a")]) == [(a, "1")]  # the same file listed thrice: read once


def test_a_bsds_style_folder_still_gives_stem_png_for_eval_edges(ckpt, tmp_path):
    (tmp_path / "val").mkdir()
    noise_png(tmp_path / "val" / "100007.jpg", 24, 16)
    assert Z.main(["edges", str(tmp_path / "val"), "--ckpt", ckpt, "--out", str(tmp_path / "pred"), "--layers", "2",
                   "--splat", "torch"]) == 0
    assert os.listdir(tmp_path / "pred") == ["100007.png"]


# ------------------------------------------------------------------------------------------ the start-up note


def test_a_checkpoint_pretrained_on_the_synthetic_scenes_is_named_at_start_up(ckpt, tmp_path, capsys):
    img = noise_png(tmp_path / "a.png", 20, 12)
    synthetic = save_ckpt(tmp_path / "synthetic.pt", data="synthetic")
    unknown = save_ckpt(tmp_path / "old.pt")  # written before checkpoints recorded their data
    notes = {}
    for name, path in (("synthetic", synthetic), ("unknown", unknown), ("photos", ckpt)):
        capsys.readouterr()
        assert Z.main(["export", img, "--ckpt", path, "--out", str(tmp_path / name)]) == 0
        notes[name] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes["synthetic"] == [f"note: {synthetic} was pretrained on the embedded synthetic scenes, so on photos "
                                  "its readings are the outlines of that model's blobs; pretrain on photos for them "
                                  "(README, zero-shot readings)"]
    assert len(notes["unknown"]) == 1 and "does not record its pretraining data" in notes["unknown"][0]
    assert notes["photos"] == []
    Z.main(["eval-depth", "--synthetic", "1", "--size", "16", "--ckpt", synthetic, "--out", str(tmp_path / "d")])
    assert "note:" not in capsys.readouterr().err  # synthetic scenes read by a synthetic model: nothing to say


# ------------------------------------------------------------------------------------------ one-line errors


def test_a_finetuned_checkpoint_is_a_one_line_error(tmp_path, capsys):
    # finetune.py's layout: encoder.* and head.* weights, the config, kind "finetune"
    state = {k: v for k, v in GMAE(CFG).state_dict().items() if k.startswith("encoder.")}
    state |= {"head.weight": torch.zeros(4, 32), "head.bias": torch.zeros(4)}
    path = str(tmp_path / "classifier.pt")
    torch.save({"model": state, "config": asdict(CFG), "kind": "finetune", "num_classes": 4}, path)
    img = noise_png(tmp_path / "a.png", 20, 12)
    message = cli_error(capsys, Z.main, ["edges", img, "--ckpt", path, "--out", str(tmp_path)])
    assert message == (f"{path} holds no decoder (a finetune.py classifier keeps the encoder and a class head); "
                       "zero-shot readings need GMAE's Gaussians: pass a checkpoint written by train.py")
    with pytest.raises(engine.CheckpointError):
        Z.load_gmae(path)


@pytest.mark.parametrize("argv, message", [
    (["layers", "x.png", "--threshold", "2"], "--threshold must be in (0, 1), got 2.0"),
    (["figure-ground", "x.png", "--threshold", "0"], "--threshold must be in (0, 1), got 0.0"),
    (["edges", "x.png", "--threshold", "1"], "--threshold must be in (0, 1), got 1.0"),
    (["eval-fg", "--synthetic", "2", "--threshold", "-0.1"], "--threshold must be in (0, 1), got -0.1"),
    (["edges", "x.png", "--max-size", "-1"], "--max-size must be in [0, inf), got -1 (0: no bound)"),
    (["eval-fg", "--synthetic", "-3"], "--synthetic must be in [0, inf), got -3 (0: a folder dataset)"),
    (["eval-depth", "--synthetic", "2", "--size", "4"], "--size must be in [8, inf), got 4 (the scenes need it)"),
    (["eval-fg", "--masks", "m", "--limit", "0"], "--limit must be in [1, inf), got 0 (leave it out for every image)"),
    (["eval-edges", "--bsds", "b", "--limit", "-1"], "--limit must be in [1, inf), got -1"),
    (["eval-edges", "--bsds", "b", "--workers", "0"], "--workers must be in [1, inf), got 0"),
    (["recon", "x.png", "--mask", "1.5"], "--mask must be in [0, 1), got 1.5"),
    (["recon", "x.png", "--mask", "nan"], "--mask must be a finite number, got nan"),
    (["edges", "x.png", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["edges", "x.png", "--tiles", "1"], "--tiles must be in [2, inf), got 1 (a window size in pixels)"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(tmp_path, capsys, argv, message):
    none = str(tmp_path / "none.pt")  # the ranges are checked before the checkpoint is read
    assert cli_error(capsys, Z.main, argv + ["--ckpt", none]).startswith(message)


def test_edges_threshold_reads_one_threshold_instead_of_the_mean(ckpt, tmp_path):
    img = torch.rand(3, 12, 20, generator=torch.Generator().manual_seed(3))
    Image.fromarray(data.to_uint8(img)).save(tmp_path / "a.png")
    img = data.to_tensor(data.load_rgb(tmp_path / "a.png"))
    net, _ = Z.load_gmae(ckpt)
    argv = [str(tmp_path / "a.png"), "--ckpt", ckpt, "--splat", "torch", "--layers", "2"]
    torch.manual_seed(0)
    Z.main(["edges", *argv, "--out", str(tmp_path / "one"), "--threshold", "0.02"])
    torch.manual_seed(0)
    one = Z.edge_map(net, img, layers=(2,), thresholds=(0.02,), backend="torch")
    torch.manual_seed(0)
    mean = Z.edge_map(net, img, layers=(2,), backend="torch")
    written = np.asarray(Image.open(tmp_path / "one" / "a.png"))
    assert np.array_equal(written, data.to_uint8(one))
    assert set(np.unique(written)) <= {0, 255} and not np.array_equal(written, data.to_uint8(mean))  # 1 cut, not 3


def fg_folder(root, n=2, size=(20, 12)):
    """root/images/<i>.png and root/masks/<i>.png (ECSSD layout), W x H = size."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        noise_png(root / "images" / f"{i}.png", *size, seed=i)
        Image.new("L", size, 255).save(root / "masks" / f"{i}.png")
    return root


def test_eval_fg_with_a_missing_broken_or_misfit_file_is_a_one_line_error(ckpt, tmp_path, capsys):
    argv = ["eval-fg", "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--splat", "torch"]
    root = fg_folder(tmp_path / "missing")
    os.remove(root / "masks" / "1.png")
    assert cli_error(capsys, Z.main, argv + ["--masks", str(root)]) == (
        f"no mask for {root / 'images' / '1.png'}: expected {root / 'masks' / '1.png'} (white = figure)")
    root = fg_folder(tmp_path / "broken_image")
    (root / "images" / "1.png").write_bytes(b"not a png")
    assert cli_error(capsys, Z.main, argv + ["--masks", str(root)]).startswith(
        f"could not read image {root / 'images' / '1.png'}")
    root = fg_folder(tmp_path / "broken_mask")
    (root / "masks" / "0.png").write_bytes(b"\x89PNG cut short")
    assert cli_error(capsys, Z.main, argv + ["--masks", str(root)]).startswith(
        f"could not read image {root / 'masks' / '0.png'}")
    root = fg_folder(tmp_path / "misfit")
    Image.new("L", (10, 6), 255).save(root / "masks" / "1.png")
    assert cli_error(capsys, Z.main, argv + ["--masks", str(root)]) == (
        f"{root / 'masks' / '1.png'} is 10 x 6 px but {root / 'images' / '1.png'} is 20 x 12: ground truth and image "
        "must have the same size")


def save_mat(path, boundary):
    import scipy.io

    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = {"Boundaries": boundary, "Segmentation": boundary + 1}
    scipy.io.savemat(path, {"groundTruth": cell})


@needs_scipy
def test_eval_edges_with_a_missing_or_broken_file_is_a_one_line_error(ckpt, tmp_path, capsys):
    bsds = tmp_path / "bsds"
    (bsds / "images" / "val").mkdir(parents=True)
    (bsds / "groundTruth" / "val").mkdir(parents=True)
    boundary = np.zeros((12, 20), np.uint8)
    boundary[6] = 1
    save_mat(bsds / "groundTruth" / "val" / "1.mat", boundary)
    argv = ["eval-edges", "--bsds", str(bsds), "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--splat", "torch"]
    assert cli_error(capsys, Z.main, argv) == (f"no image for {bsds / 'groundTruth' / 'val' / '1.mat'}: expected "
                                               f"{bsds / 'images' / 'val' / '1.jpg'}")
    (bsds / "images" / "val" / "1.jpg").write_bytes(b"not a jpeg")
    assert cli_error(capsys, Z.main, argv).startswith(f"could not read image {bsds / 'images' / 'val' / '1.jpg'}")
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(bsds / "images" / "val" / "1.jpg")
    (bsds / "groundTruth" / "val" / "1.mat").write_bytes(b"MATLAB 5.0 MAT-file, cut")
    assert cli_error(capsys, Z.main, argv).startswith(
        f"could not read BSDS ground truth {bsds / 'groundTruth' / 'val' / '1.mat'}: ")
    save_mat(bsds / "groundTruth" / "val" / "1.mat", boundary)  # mended: the scores land where study.py reads them
    assert Z.main(argv + ["--nthresh", "3"]) == 0
    with open(tmp_path / "out" / "bsds_val" / "scores.json") as f:
        assert set(json.load(f)) == {"learned", "permuted", "radial", "sobel"}
    # scoring a folder of edge PNGs: a broken PNG, a broken .mat, a PNG of another size
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    save_mat(gt / "1.mat", boundary)
    (pred / "1.png").write_bytes(b"not a png")
    score = ["eval-edges", "--pred", str(pred), "--gt", str(gt), "--nthresh", "3"]
    assert cli_error(capsys, Z.main, score).startswith(f"could not read image {pred / '1.png'}")
    Image.new("L", (21, 12)).save(pred / "1.png")
    assert cli_error(capsys, Z.main, score) == (f"{gt / '1.mat'} is 20 x 12 px but {pred / '1.png'} is 21 x 12: "
                                                "ground truth and image must have the same size")
    (gt / "1.mat").write_bytes(b"")
    assert cli_error(capsys, Z.main, score).startswith(f"could not read BSDS ground truth {gt / '1.mat'}: ")


@needs_scipy
def test_bsds_matching_on_two_processes_scores_as_on_one(tmp_path):
    pytest.importorskip("pyEdgeEval")
    import zeroshot_eval as ZE

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i in range(3):  # a vertical line, the prediction off by 0, 2 and 8 px: matched within 0.0075 x 500 px
        boundary = np.zeros((300, 400), np.uint8)
        boundary[50:250, 100 + 50 * i] = 1
        save_mat(gt / f"{i}.mat", boundary)
        edge = np.zeros((300, 400), np.uint8)
        edge[50:250, 100 + 50 * i + (0, 2, 8)[i]] = 255
        Image.fromarray(edge).save(pred / f"{i}.png")
    one = ZE.score_edge_folder(str(pred), str(gt), nthresh=3, workers=1)
    two = ZE.score_edge_folder(str(pred), str(gt), nthresh=3, workers=2)
    assert one["ODS"] == pytest.approx(2 / 3, abs=0.02)  # 2 of 3 lines matched: P = R = 2/3
    for k in ("ODS", "OIS", "AP"):
        assert two[k] == pytest.approx(one[k], abs=0.02), k  # the matcher's random outlier edges, nothing more
    (pred / "1.png").write_bytes(b"not a png")  # a broken file stops the parallel scoring with its name
    with pytest.raises(data.BrokenImageError, match="1.png"):
        ZE.score_edge_folder(str(pred), str(gt), nthresh=3, workers=2)
