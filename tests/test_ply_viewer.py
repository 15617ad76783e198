"""What `zeroshot.py export` writes, drawn by a renderer that is not the project's (tests/gs_viewer.py: the 3DGS
conventions, reading the PLY and the cameras file as a viewer does), matches the project's own render.

The export (splat.to_pinhole) places each Gaussian where a pinhole camera at the origin sees it at the pixel
splat.project gives, at the depth its footprint uses, and shears its covariance so that the pinhole's EWA Jacobian
draws the footprint splat.project draws. Scenes: a synthetic scene (square) and a photo (481 x 321) through the
export command, and random anisotropic Gaussians off the axis, where the shear matters most. Each must come within
25 dB of the project's render; the file as it was before (scales 8 x what is drawn) must fall far below.

Run:  pytest -q tests/test_ply_viewer.py
      python -m pytest -q -s tests/test_ply_viewer.py -k buys      (prints the PSNRs docs/design.md 2 quotes)
"""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ply
import splat
import zeroshot as Z
from gs_viewer import psnr
from gs_viewer import render as view
from model import GMAE, GMAEConfig

CFG = GMAEConfig(img_size=32, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                 dec_heads=2, num_gaussians=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train.py-layout checkpoint of a randomly initialised GMAE with 64 Gaussians (built, not trained)."""
    path = tmp_path_factory.mktemp("viewer") / "gmae.pt"
    torch.manual_seed(0)
    torch.save({"model": GMAE(CFG).state_dict(), "config": asdict(CFG)}, path)
    return str(path)


def photo(path, W=481, H=321):
    """A photo-like picture: smooth colour fields and a few hard-edged shapes."""
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.4 + 0.3 * np.cos(5 * y), 0.3 + 0.5 * x * y], -1)
    img[(x - 0.5) ** 2 + (y - 0.3) ** 2 < 0.02] = [0.9, 0.1, 0.1]
    img[(np.abs(x - 0.2) < 0.08) & (np.abs(y - 0.45) < 0.15)] = [0.1, 0.2, 0.8]
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def project_render(g, H, W):
    return splat.render(g[None].double(), H, W, backend="torch")[0].numpy()


def exported_and_project(ckpt, image_path, out):
    """Run `zeroshot.py export` on one picture; (viewer render, project render of the same Gaussians, paths)."""
    assert Z.main(["export", str(image_path), "--ckpt", ckpt, "--out", str(out), "--device", "cpu"]) == 0
    stem = image_path.stem
    scene_file, cameras = out / f"{stem}.ply", out / f"{stem}_cameras.json"
    img = data.to_tensor(data.load_rgb(str(image_path)))
    net, _ = Z.load_gmae(ckpt)
    g, _ = Z.image_gaussians(net, img[None])
    H, W = img.shape[-2:]
    return view(scene_file, cameras), project_render(g[0].detach(), H, W), scene_file, cameras


def synthetic_png(path):
    scene = data.SyntheticScenes(4, 32, seed=3).scene(1)["image"]
    Image.fromarray((scene.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("picture", ["synthetic 32 x 32", "photo 481 x 321"])
def test_a_3dgs_renderer_draws_the_export_as_the_project_does(ckpt, tmp_path, picture):
    image = synthetic_png(tmp_path / "scene.png") if picture.startswith("synthetic") else photo(tmp_path / "photo.png")
    viewed, ours, scene_file, cameras = exported_and_project(ckpt, image, tmp_path / "out")
    H, W = ours.shape[-2:]
    assert viewed.shape == ours.shape == (3, *Image.open(image).size[::-1])
    assert psnr(viewed, ours) >= 25, psnr(viewed, ours)

    # The file as it was before: a viewer framed to put the centres right still draws each footprint 8 x wide.
    old = tmp_path / "old.ply"
    scene = ply.read_ply(scene_file).double()
    scene[:, 3:6] *= splat.CAMERA_DISTANCE
    ply.write_ply(old, scene)
    assert psnr(view(old, cameras), ours) < 18


def test_cameras_file_is_the_3dgs_layout_with_the_photos_size(ckpt, tmp_path):
    photo(tmp_path / "p.png", W=90, H=60)
    assert Z.main(["export", str(tmp_path / "p.png"), "--ckpt", ckpt, "--out", str(tmp_path / "out")]) == 0
    cameras = json.loads((tmp_path / "out" / "p_cameras.json").read_text())
    assert cameras == [{"id": 0, "img_name": "p", "width": 90, "height": 60, "position": [0.0, 0.0, 0.0],
                        "rotation": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "fy": 45.0, "fx": 45.0}]
    scene = ply.read_ply(tmp_path / "out" / "p.ply")
    # Square pixels: the scene keeps the photo's aspect, x spanning 3/2 of y at each depth (+-Z vs +-Z 2/3).
    assert (scene[:, 0].abs() / scene[:, 2]).max() <= 1 and (scene[:, 1].abs() / scene[:, 2]).max() <= 2 / 3


@pytest.mark.parametrize("H, W", [(40, 40), (30, 50)])
def test_off_axis_anisotropic_gaussians_need_the_shear(H, W, tmp_path):
    # Gaussians near the image's edges, long along z: there the project's J and a pinhole's differ most (the
    # off-axis terms, 1/Z of a pinhole's). With the shear the viewer matches the project; with the same scales
    # and rotations and no shear, it does not.
    g = splat.random_gaussians(1, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    g[:, :2] = torch.rand(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 1.6 - 0.8
    g[:, 3:6] = torch.tensor([0.8, 0.8, 6.0], dtype=torch.float64)
    g[:, 6:10] = torch.nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(7),
                                                           dtype=torch.float64), dim=-1)
    ours = project_render(g, H, W)
    scene, camera = splat.to_pinhole(g, H, W)
    ply.write_ply(tmp_path / "g.ply", scene)
    ply.write_cameras(tmp_path / "c.json", "g", camera)
    sheared = psnr(view(tmp_path / "g.ply", tmp_path / "c.json"), ours)
    naive = scene.clone()
    naive[:, 3:10] = g[:, 3:10]  # the model's own scales and rotation, centres unprojected as before
    ply.write_ply(tmp_path / "naive.ply", naive)
    unsheared = psnr(view(tmp_path / "naive.ply", tmp_path / "c.json"), ours)
    assert sheared >= 30 and sheared > unsheared + 5, (sheared, unsheared)


def test_to_pinhole_projects_centres_to_the_projects_pixels_and_keeps_the_footprint():
    H, W = 21, 34
    g = splat.random_gaussians(1, 30, generator=torch.Generator().manual_seed(8), dtype=torch.float64, scale_max=1.5)
    scene, camera = splat.to_pinhole(g[0], H, W)
    means2d, conic, zc, *_ = splat.project(g, H, W)
    X, Y, Zc = scene[:, :3].unbind(-1)
    torch.testing.assert_close(torch.stack([camera["fx"] * X / Zc + camera["cx"], camera["fy"] * Y / Zc + camera["cy"]],
                                           -1), means2d[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(Zc, zc[0], rtol=0, atol=1e-12)  # the depth order is the project's
    # The pinhole's EWA footprint of the exported covariance is the project's 2-D covariance.
    sigma3 = splat.covariance3d(scene[:, 3:6], scene[:, 6:10])
    J = torch.zeros(30, 2, 3, dtype=torch.float64)
    J[:, 0, 0], J[:, 0, 2] = camera["fx"] / Zc, -camera["fx"] * X / Zc**2
    J[:, 1, 1], J[:, 1, 2] = camera["fy"] / Zc, -camera["fy"] * Y / Zc**2
    cov = J @ sigma3 @ J.transpose(-1, -2) + splat.EPS2D * torch.eye(2, dtype=torch.float64)
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    ours = torch.stack([cov[:, 1, 1], -cov[:, 0, 1], cov[:, 0, 0]], -1) / det[:, None]
    torch.testing.assert_close(ours, conic[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(scene[:, 6:10].norm(dim=-1), torch.ones(30, dtype=torch.float64))


def test_degenerate_values_are_written_finite_and_nan_is_refused(tmp_path):
    g = splat.random_gaussians(1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)[0]
    g[0, 3:6] = 0.0  # a flat Gaussian: log(0) would be -inf
    g[1, 6:10] = 0.0  # a zero quaternion: NaN in 3DGS's build_rotation
    g[2, 13] = 1.0  # opacity 1: logit inf
    ply.write_ply(tmp_path / "g.ply", g)
    stored = ply.read_ply(tmp_path / "g.ply")
    assert torch.isfinite(stored).all() and torch.equal(stored[1, 6:10], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    scene, _ = splat.to_pinhole(g, 16, 16)  # the export's own path never makes them in the first place
    assert (scene[:, 3:6] >= 1e-6).all() and torch.allclose(scene[:, 6:10].norm(dim=-1), torch.ones(3).double())
    g[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf; nothing written"):
        ply.write_ply(tmp_path / "nan.ply", g)
    assert not (tmp_path / "nan.ply").exists() and not (tmp_path / "nan.ply.tmp").exists()
    with pytest.raises(ValueError, match="finite Gaussians"):
        splat.to_pinhole(g, 16, 16)


def aspect_only(g, H, W):
    """Scales and quaternions [K, 7] of Gaussians g for a pinhole at H x W with only the aspect correction of
    to_pinhole (its diag(1, H / W, 1)), without the shear: what leaving out the off-axis terms costs."""
    A = torch.diag(torch.tensor([1.0, H / W, 1.0], dtype=torch.float64))
    eigenvalues, R = torch.linalg.eigh(A @ splat.covariance3d(g[:, 3:6], g[:, 6:10]) @ A.T)
    R = R * torch.where(torch.linalg.det(R) < 0, -1.0, 1.0).to(R)[:, None, None]
    return torch.cat([eigenvalues.clamp_min(1e-12).sqrt(), splat.rotmat_to_quat(R)], -1)


def measure(folder):
    """PSNR (dB) against the project's render of each picture's export, as written and in three variants."""
    import pathlib

    folder = pathlib.Path(folder)
    torch.manual_seed(0)
    torch.save({"model": GMAE(CFG).state_dict(), "config": asdict(CFG)}, folder / "gmae.pt")
    rows = {}
    for name, image in (("synthetic 32 x 32", synthetic_png(folder / "scene.png")),
                        ("photo 481 x 321", photo(folder / "photo.png"))):
        viewed, ours, scene_file, cameras = exported_and_project(str(folder / "gmae.pt"), image, folder / "out")
        net, _ = Z.load_gmae(str(folder / "gmae.pt"))
        g = Z.image_gaussians(net, data.to_tensor(data.load_rgb(str(image)))[None])[0][0].detach().double()
        variants = {"as exported": scene_file}
        for variant, columns in (("scales x 8 (before)", None), ("the model's scales and rotations", g[:, 3:10]),
                                 ("aspect kept, no shear", aspect_only(g, *ours.shape[-2:]))):
            scene = ply.read_ply(scene_file).double()
            if columns is None:
                scene[:, 3:6] *= splat.CAMERA_DISTANCE
            else:
                scene[:, 3:10] = columns
            ply.write_ply(folder / f"{len(variants)}.ply", scene)
            variants[variant] = folder / f"{len(variants)}.ply"
        rows[name] = {variant: psnr(view(path, cameras), ours) for variant, path in variants.items()}
    return rows



def test_what_each_part_of_the_export_buys(tmp_path):
    # The PSNRs docs/design.md 2 quotes; printed with  python -m pytest -q -s tests/test_ply_viewer.py -k buys
    rows = measure(tmp_path)
    for picture, row in rows.items():
        print(f"\n{picture}: " + ", ".join(f"{variant} {db:.1f} dB" for variant, db in row.items()))
        assert row["as exported"] >= 60  # float32 storage and the viewer's 0.99 clamp are all that is left
        assert row["scales x 8 (before)"] < 15
        assert row["aspect kept, no shear"] < row["as exported"] - 20
        assert row["the model's scales and rotations"] <= row["aspect kept, no shear"] + 0.01  # same if square
