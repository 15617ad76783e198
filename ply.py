"""
The scene files `zeroshot.py export` writes, in the layout of the original 3D Gaussian Splatting code (Kerbl et al.
2023) that splat viewers read: a binary PLY of the Gaussians (write_ply, read_ply) and a cameras.json of the camera
that draws them as the project does (write_cameras; the scene and camera come from splat.to_pinhole). How the two
cameras relate: docs/design.md 2. Checked by an independent 3DGS-convention renderer: tests/test_ply_viewer.py.

Try it:  python zeroshot.py export photo.jpg          (<stem>.ply and <stem>_cameras.json)
"""
import json

import numpy as np
import torch

import engine

SH_C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))
PLY_FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(45)),
              "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


def write_ply(path, g):
    """Write Gaussians [K, 14] as a binary little-endian PLY with the vertex properties of 3DGS's save_ply, in its
    order (float32), whole or not at all (a temporary file renamed over path):
        x y z        centre
        nx ny nz     0 (unused, kept because 3DGS writes them)
        f_dc_0..2    (rgb - 0.5) / SH_C0, colour as a degree-0 spherical harmonic
        f_rest_0..44 0: the view-dependent bands of SH degree 3, so the original 3DGS code loads the file with
                     its defaults (its load_ply asserts 45 of them)
        opacity      logit(opacity), opacities clamped to [1e-6, 1 - 1e-6]
        scale_0..2   log(scale), scales at least 1e-12
        rot_0..3     unit quaternion (w, x, y, z); a zero one is written as the identity (1, 0, 0, 0)
    zeroshot export passes the scene of splat.to_pinhole, in its camera's frame. Non-finite values: ValueError."""
    g = g.detach().double().cpu().numpy()
    if not np.isfinite(g).all():
        raise ValueError(f"{path}: the Gaussians hold NaN or inf; nothing written")
    opacity = np.clip(g[:, 13], 1e-6, 1 - 1e-6)
    norm = np.linalg.norm(g[:, 6:10], axis=1, keepdims=True)
    quat = np.where(norm > 1e-12, g[:, 6:10] / np.maximum(norm, 1e-12), [1.0, 0.0, 0.0, 0.0])
    cols = [g[:, 0], g[:, 1], g[:, 2], *np.zeros((3, len(g))), *((g[:, 10:13] - 0.5) / SH_C0).T,
            *np.zeros((45, len(g))), np.log(opacity / (1 - opacity)), *np.log(np.maximum(g[:, 3:6], 1e-12)).T,
            *quat.T]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(g)}",
              *(f"property float {name}" for name in PLY_FIELDS), "end_header"]
    engine.write_whole(path, ("\n".join(header) + "\n").encode("ascii") + np.stack(cols, axis=1).astype("<f4").tobytes())


def write_cameras(path, name, camera):
    """The camera of splat.to_pinhole as a 3DGS cameras.json: one entry, camera-to-world position and rotation
    (the identity: the scene is in the camera's frame), the picture's size and focal lengths in pixels."""
    entry = {"id": 0, "img_name": name, "width": camera["W"], "height": camera["H"], "position": [0.0, 0.0, 0.0],
             "rotation": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "fy": camera["fy"], "fx": camera["fx"]}
    engine.write_whole(path, (json.dumps([entry], indent=1) + "\n").encode())


def read_ply(path):
    """Read a PLY written by write_ply back into Gaussians [K, 14] (float32 values, as stored)."""
    with open(path, "rb") as f:
        lines = []
        while not lines or lines[-1] != "end_header":
            lines.append(f.readline().decode("ascii").strip())
        names = [ln.split()[-1] for ln in lines if ln.startswith("property")]
        count = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[-1])
        if tuple(names) != PLY_FIELDS:
            raise ValueError(f"{path}: expected the properties of write_ply, got {tuple(names)[:12]} ...")
        rows = np.frombuffer(f.read(4 * len(names) * count), dtype="<f4").reshape(count, len(names))
    col = {n: rows[:, i].astype(np.float64) for i, n in enumerate(names)}
    xyz = np.stack([col["x"], col["y"], col["z"]], 1)
    scale = np.exp(np.stack([col[f"scale_{i}"] for i in range(3)], 1))
    quat = np.stack([col[f"rot_{i}"] for i in range(4)], 1)
    rgb = np.stack([col[f"f_dc_{i}"] for i in range(3)], 1) * SH_C0 + 0.5
    opacity = 1 / (1 + np.exp(-col["opacity"]))
    return torch.from_numpy(np.concatenate([xyz, scale, quat, rgb, opacity[:, None]], 1)).float()
