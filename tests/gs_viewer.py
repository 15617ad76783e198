"""A small forward rasterizer in the conventions of the original 3D Gaussian Splatting code and the viewers built on
it (Kerbl et al. 2023), written for tests/test_ply_viewer.py from the paper and its file formats, independent of
splat.py: it reads what `zeroshot.py export` writes as a viewer would, and draws it.

    load_ply:     the vertex properties by name from the header (any order, any number of f_rest_*, as 3DGS's
                  load_ply does with plyfile); colour = 0.5 + C0 f_dc (degree 0: the f_rest_* bands are zero),
                  opacity = sigmoid, scale = exp, rotation = the normalised quaternion (w, x, y, z).
    load_camera:  the first entry of a 3DGS cameras.json (camera-to-world position and rotation, fx, fy, size).
    render:       per Gaussian, view-space mean t = W2C p, culled if t_z <= 0.2; EWA (Zwicker et al. 2002) with
                  the full Jacobian J = [[fx/tz, 0, -fx tx/tz^2], [0, fy/tz, -fy ty/tz^2]], tx/tz and ty/tz
                  clamped to 1.3 x the half field of view, Sigma2 = J W Sigma3 W^T J^T + 0.3 I; the mean at
                  (fx tx/tz + W/2, fy ty/tz + H/2) with pixel centres at i + 0.5; pixels within 3 sqrt(larger
                  eigenvalue) of it on each axis (3DGS takes the whole 16 px tiles that square meets: this is the
                  stricter of the two); front to back by t_z, alpha = min(0.99, opacity exp(power)), skipped below
                  1/255, a pixel done once T would fall under 1e-4; then C + T background.
Dense numpy in float64: for tests, small images.
"""
import json
import math

import numpy as np

C0 = 0.28209479177387814


def load_ply(path):
    """(xyz [K, 3], scale [K, 3], rotation [K, 3, 3], rgb [K, 3], opacity [K]) from a binary little-endian PLY."""
    with open(path, "rb") as f:
        header = []
        while not header or header[-1] != "end_header":
            header.append(f.readline().decode("ascii").strip())
        assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0", header[:2]
        count = int(next(line for line in header if line.startswith("element vertex")).split()[2])
        props = [line.split() for line in header if line.startswith("property")]
        assert all(p[1] == "float" for p in props), "3DGS files hold float32 properties"
        names = [p[2] for p in props]
        table = np.frombuffer(f.read(4 * len(names) * count), dtype="<f4").reshape(count, len(names))
        assert f.read() == b"", "bytes after the vertex table"
    col = {name: table[:, i].astype(np.float64) for i, name in enumerate(names)}
    xyz = np.stack([col["x"], col["y"], col["z"]], 1)
    rgb = np.maximum(0.5 + C0 * np.stack([col[f"f_dc_{i}"] for i in range(3)], 1), 0)
    opacity = 1 / (1 + np.exp(-col["opacity"]))
    scale = np.exp(np.stack([col[f"scale_{i}"] for i in range(3)], 1))
    q = np.stack([col[f"rot_{i}"] for i in range(4)], 1)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)  # a zero quaternion would make NaN here, as in build_rotation
    w, x, y, z = q.T
    R = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                  2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                  2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)
    return xyz, scale, R, rgb, opacity


def load_camera(path):
    """(world-to-camera rotation [3, 3], translation [3], fx, fy, width, height) of the first camera."""
    cam = json.load(open(path))[0]
    c2w_rotation, position = np.array(cam["rotation"], dtype=np.float64), np.array(cam["position"], dtype=np.float64)
    return c2w_rotation.T, -c2w_rotation.T @ position, cam["fx"], cam["fy"], cam["width"], cam["height"]


def render(ply_path, camera_path, background=1.0):
    """The picture [3, H, W] a 3DGS viewer draws of the PLY from the first camera of the cameras file."""
    xyz, scale, R, rgb, opacity = load_ply(ply_path)
    W2C, translation, fx, fy, width, height = load_camera(camera_path)
    t = xyz @ W2C.T + translation  # [K, 3], view space
    keep = t[:, 2] > 0.2
    t, scale, R, rgb, opacity = t[keep], scale[keep], R[keep], rgb[keep], opacity[keep]
    limx, limy = 1.3 * width / (2 * fx), 1.3 * height / (2 * fy)  # 1.3 tan(fov / 2)
    tz = t[:, 2]
    tx, ty = np.clip(t[:, 0] / tz, -limx, limx) * tz, np.clip(t[:, 1] / tz, -limy, limy) * tz
    J = np.zeros((len(t), 2, 3))
    J[:, 0, 0], J[:, 0, 2] = fx / tz, -fx * tx / tz**2
    J[:, 1, 1], J[:, 1, 2] = fy / tz, -fy * ty / tz**2
    M = J @ W2C @ R * scale[:, None, :]  # J W R S
    cov = M @ M.transpose(0, 2, 1) + 0.3 * np.eye(2)
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    conic = np.stack([cov[:, 1, 1], -cov[:, 0, 1], cov[:, 0, 0]], 1) / det[:, None]
    mid = (cov[:, 0, 0] + cov[:, 1, 1]) / 2
    radius = np.ceil(3 * np.sqrt(mid + np.sqrt(np.maximum(0.1, mid**2 - det))))
    u, v = fx * t[:, 0] / tz + width / 2, fy * t[:, 1] / tz + height / 2

    py, px = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    C, T = np.zeros((3, height, width)), np.ones((height, width))
    done = np.zeros((height, width), dtype=bool)
    for k in np.argsort(tz, kind="stable"):
        dx, dy = px - u[k], py - v[k]
        power = -0.5 * (conic[k, 0] * dx * dx + conic[k, 2] * dy * dy) - conic[k, 1] * dx * dy
        alpha = np.minimum(0.99, opacity[k] * np.exp(power))
        inside = (np.abs(px - u[k]) <= radius[k]) & (np.abs(py - v[k]) <= radius[k])
        use = inside & (power <= 0) & (alpha >= 1 / 255) & ~done
        T_next = T * (1 - alpha)
        stop = use & (T_next < 1e-4)
        done |= stop
        use &= ~stop
        C += np.where(use, alpha * T, 0) * rgb[k][:, None, None]
        T = np.where(use, T_next, T)
    return C + T * background


def psnr(a, b):
    """PSNR in dB of two images in [0, 1]."""
    return 10 * math.log10(1 / float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b)) ** 2)))
