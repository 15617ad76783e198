"""`edges --tiles WIN` (zeroshot.edge_map): the windows' offsets and the tent weights that blend them.

    windows: WIN x WIN, stride WIN / 2, the last one ending at the image's edge (zeroshot.window_starts)
    tent(n)_i = 1 - |2 (i + 0.5) / n - 1| + 0.001         blend = sum_w tent2d_w e_w / sum_w tent2d_w

The model and the edge reading are replaced by stand-ins, so the blend is all that is measured: a reading that
returns each window's own pixels must give back the image, and constant readings give hand-computed mixes.

Run:  pytest -q tests/test_tiled_edges.py
"""
from types import SimpleNamespace

import pytest
import torch

import zeroshot as Z


class WindowNet:
    """Stands in for GMAE at S = WIN: remembers the crop it was given (no resize: crops are already S x S)."""

    def __init__(self, win):
        self.cfg = SimpleNamespace(img_size=win)
        self.crops = []

    def gaussians(self, x, mask_ratio=0.0, generator=None):
        self.crops.append(x[0].clone())
        return torch.zeros(1, 1, 14), None


def tiled(monkeypatch, img, win, reading):
    """edge_map(--tiles win) with each window's soft edge map replaced by reading(crop [3, h, w]) -> [h, w]."""
    net = WindowNet(win)
    monkeypatch.setattr(Z, "soft_edges", lambda g, H, W, *a, **kw: reading(net.crops[-1])[None])
    return Z.edge_map(net, img, tiles=win), net.crops


def test_window_starts_by_hand():
    assert Z.window_starts(40, 16) == [0, 8, 16, 24]  # 24 + 16 = 40: the last window ends at the edge
    assert Z.window_starts(45, 16) == [0, 8, 16, 24, 29]  # one more window, shifted to end at 45
    assert Z.window_starts(16, 16) == [0]
    assert Z.window_starts(12, 5) == [0, 2, 4, 6, 7]  # stride 5 // 2 = 2


def test_tent_weights_by_hand():
    assert Z.tent(4).tolist() == pytest.approx([0.251, 0.751, 0.751, 0.251])
    assert Z.tent(8).tolist() == pytest.approx([0.126, 0.376, 0.626, 0.876, 0.876, 0.626, 0.376, 0.126])


def test_each_window_reads_its_own_pixels_and_goes_back_to_its_own_place(monkeypatch):
    H, W, win = 45, 40, 16  # rows 0, 8, 16, 24, 29; columns 0, 8, 16, 24
    img = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    out, crops = tiled(monkeypatch, img, win, lambda crop: crop[0])  # the "edge map" of a window: its red channel
    torch.testing.assert_close(out, img[0], rtol=0, atol=1e-6)  # a blend of the right pixels is the image itself
    assert len(crops) == 5 * 4
    for k, (top, left) in enumerate((t, l) for t in (0, 8, 16, 24, 29) for l in (0, 8, 16, 24)):
        assert torch.equal(crops[k], img[:, top:top + win, left:left + win])


def test_overlapping_windows_blend_with_tent_weights(monkeypatch):
    # 8 x 12 image, window 8: one row of windows, at columns 0 and 4. The left window reads 1, the right one 3.
    img = torch.zeros(3, 8, 12)
    img[:, :, 8:] = 1.0  # only the right window sees this: it tells the two apart
    out, _ = tiled(monkeypatch, img, 8, lambda crop: torch.full(crop.shape[-2:], 3.0 if crop.max() > 0 else 1.0))
    tent = [0.126, 0.376, 0.626, 0.876, 0.876, 0.626, 0.376, 0.126]
    expected = [1.0] * 4 + [(tent[c] * 1 + tent[c - 4] * 3) / (tent[c] + tent[c - 4]) for c in range(4, 8)] + [3.0] * 4
    for row in out:  # the row weights are the same for both windows and cancel
        assert row.tolist() == pytest.approx(expected, abs=1e-5)
    assert out[0, 4].item() == pytest.approx((0.876 + 3 * 0.126) / 1.002, abs=1e-5)  # 1.2515: mostly the left window
