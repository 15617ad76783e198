"""data.SyntheticScenes(fg_anywhere=True), the val set where a centre prior cannot find the object, moves the
foreground and nothing else: the same background, occluders, label and foreground shape; only the
foreground's centre is drawn from [0.1, 0.9] of the image instead of [0.3, 0.7].

Outside both foregrounds (and the anti-aliased rim around each, which reaches half a pixel past the shape:
2 pixels of margin here) the two scenes are the same pixels and the same layer ids.

Run:  pytest -q tests/test_fg_anywhere.py
"""
import torch
import torch.nn.functional as F

import data


def grow(mask, px):
    """[H, W] bool dilated by px pixels (a (2 px + 1)^2 square)."""
    return F.max_pool2d(mask[None, None].float(), 2 * px + 1, stride=1, padding=px)[0, 0] > 0


def test_fg_anywhere_moves_only_the_foreground():
    centred = data.SyntheticScenes(40, 64, seed=5)
    anywhere = data.SyntheticScenes(40, 64, seed=5, fg_anywhere=True)
    moved = 0
    for i in range(40):
        c, a = centred.scene(i), anywhere.scene(i)
        assert c["label"] == a["label"]
        fg_id = c["layers"].max()
        assert a["layers"].max() == fg_id and torch.equal(c["mask"], c["layers"] == fg_id)  # same shapes painted
        outside = ~grow(c["mask"] | a["mask"], 2)
        assert outside.sum() > 0.1 * 64 * 64  # enough left to compare
        assert torch.equal(c["image"][:, outside], a["image"][:, outside]), i  # background and occluders as they were
        assert torch.equal(c["layers"][outside], a["layers"][outside]), i
        moved += not torch.equal(c["mask"], a["mask"])
    assert moved >= 35  # almost every foreground moved (the two centre draws differ)
