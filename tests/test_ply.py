"""ply.write_ply against the 3DGS file layout, read here from the raw bytes (struct), never with read_ply:
a mistake made the same way in the writer and its reader would cancel out in a round trip.

The 3DGS reference code (Kerbl et al. 2023, scene/gaussian_model.py save_ply / load_ply) and the viewers that
read its files expect, per vertex, little-endian float32 in this order
    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_44  opacity  scale_0 scale_1 scale_2  rot_0 .. rot_3
(its load_ply asserts 45 f_rest_* at its default SH degree 3; ours are zero: colour does not change with view)
and apply, on reading,
    rgb = 0.5 + C0 f_dc (C0 = 1 / (2 sqrt(pi)) = 0.28209479),  opacity = sigmoid(opacity),
    scale = exp(scale),  rotation = normalize(rot_0..3) with rot_0 = w.

Run:  pytest -q tests/test_ply.py
"""
import math
import struct

import pytest
import torch

import model as M
import ply

FIELDS = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(45)),
          "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
ROW = 4 * len(FIELDS)  # bytes per vertex: 62 float32
C0 = 1 / (2 * math.sqrt(math.pi))


def read_raw(path):
    """(header lines, rows as lists of 62 floats, bytes after the rows) parsed with struct from the file's bytes."""
    raw = open(path, "rb").read()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    count = int(lines[2].split()[2])
    body = raw[end:]
    rows = [list(struct.unpack_from(f"<{len(FIELDS)}f", body, ROW * i)) for i in range(count)]
    return lines, rows, body[ROW * count:]


def sigmoid(t):
    return 1 / (1 + math.exp(-t))


def test_ply_header_is_the_3dgs_binary_little_endian_layout(tmp_path):
    g = M.gaussian_activation(torch.randn(5, 14, generator=torch.Generator().manual_seed(0)))
    ply.write_ply(tmp_path / "g.ply", g)
    lines, rows, rest = read_raw(tmp_path / "g.ply")
    assert lines == ["ply", "format binary_little_endian 1.0", "element vertex 5",
                     *[f"property float {name}" for name in FIELDS], "end_header"]
    assert len(rows) == 5 and rest == b""  # the body is exactly 4 bytes x 62 properties x K, nothing after it
    assert all(row[9:54] == [0.0] * 45 for row in rows)  # f_rest_0..44


def test_ply_values_follow_the_3dgs_conventions(tmp_path):
    # Values chosen so that every stored number is known by hand.
    g = torch.tensor([
        # x     y     z     scale (e^-1, e^-2, 1)                 quat (w, x, y, z)  rgb = 0.5 + C0 f_dc      opacity
        [0.25, -0.5, 0.75, math.exp(-1), math.exp(-2), 1.0, 0.8, 0.0, 0.6, 0.0, 0.5 + C0, 0.5, 0.5 - 2 * C0, sigmoid(2.0)],
        [-1.0, 1.0, -0.1, 0.5, 0.25, 2.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5 + 0.5 * C0, 0.5, sigmoid(-3.0)],
    ], dtype=torch.float64)
    ply.write_ply(tmp_path / "g.ply", g)
    _, rows, _ = read_raw(tmp_path / "g.ply")
    expected = [
        [0.25, -0.5, 0.75, 0, 0, 0, 1.0, 0.0, -2.0, *[0] * 45, 2.0, -1.0, -2.0, 0.0, 0.8, 0.0, 0.6, 0.0],
        [-1.0, 1.0, -0.1, 0, 0, 0, 0.0, 0.5, 0.0, *[0] * 45, -3.0, math.log(0.5), math.log(0.25), math.log(2.0), 0, 0,
         0, 1.0],
    ]
    for row, want in zip(rows, expected):
        assert dict(zip(FIELDS, row)) == pytest.approx(dict(zip(FIELDS, want)), abs=2e-6)
    assert C0 == pytest.approx(0.28209479, abs=1e-8) and ply.SH_C0 == pytest.approx(C0, abs=1e-15)


def test_a_3dgs_reader_gets_back_the_models_gaussians(tmp_path):
    # What a viewer does with the file (sigmoid, exp, 0.5 + C0 f_dc, normalise the quaternion) gives back the
    # Gaussians the model predicted; the quaternion is stored unit-length, w first.
    g = M.gaussian_activation(torch.randn(20, 14, generator=torch.Generator().manual_seed(1)) * 2, scale_max=2.0)
    ply.write_ply(tmp_path / "g.ply", g)
    _, rows, _ = read_raw(tmp_path / "g.ply")
    for row, want in zip(rows, g.tolist()):
        f = dict(zip(FIELDS, row))
        quat = [f[f"rot_{i}"] for i in range(4)]
        assert math.sqrt(sum(q * q for q in quat)) == pytest.approx(1.0, abs=1e-6)
        read = [f["x"], f["y"], f["z"], *(math.exp(f[f"scale_{i}"]) for i in range(3)), *quat,
                *(0.5 + C0 * f[f"f_dc_{i}"] for i in range(3)), sigmoid(f["opacity"])]
        assert read == pytest.approx(want, abs=1e-5)
        assert (f["nx"], f["ny"], f["nz"]) == (0.0, 0.0, 0.0)


def test_opacity_of_one_or_zero_is_stored_as_a_finite_clamped_logit(tmp_path):
    g = M.gaussian_activation(torch.zeros(2, 14))
    g[0, 13], g[1, 13] = 1.0, 0.0
    ply.write_ply(tmp_path / "g.ply", g)
    _, rows, _ = read_raw(tmp_path / "g.ply")
    logit = math.log((1 - 1e-6) / 1e-6)  # opacities clamped to [1e-6, 1 - 1e-6]: 13.8155
    opacity = FIELDS.index("opacity")
    assert rows[0][opacity] == pytest.approx(logit, rel=1e-6) and rows[1][opacity] == pytest.approx(-logit, rel=1e-6)
