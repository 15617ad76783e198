"""GMAE's decoder input and anchored query positions (model.GaussianDecoder, GMAEConfig.anchors), by hand:

    token 0        embed(cls latent) + pos_0 (= 0)
    token 1 + j    embed(latent j) + pos_{1 + i}       i = ids_keep[j], the patch latent j came from (the gather)
    query q        queries_q + sincos(anchor point of q in patch-grid units)
    centre of Gaussian j:  x, y = tanh(raw_xy + atanh(a_j)),  a_j its anchor: with raw 0 it sits on a_j

16 px images, patch 4: a 4 x 4 patch grid; 16 anchors are the patch centres, x and y in {-0.75, -0.25, 0.25, 0.75},
in raster order (x fastest).

Run:  pytest -q tests/test_anchored_queries.py
"""
import math

import torch
import torch.nn as nn

import model as M

CENTRES = [-0.75, -0.25, 0.25, 0.75]


def config(**kw):
    base = dict(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                dec_heads=2, num_gaussians=16, anchors=True)
    return M.GMAEConfig(**{**base, **kw})


class Record(nn.Module):
    """A decoder block that keeps its input and passes it on unchanged."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return x


def test_decoder_tokens_carry_their_own_patch_position_and_queries_their_anchors():
    torch.manual_seed(0)
    dec = M.GaussianDecoder(config())
    dec.blocks = nn.ModuleList([Record()])
    _, _, _, ids_keep = M.random_masking(torch.zeros(2, 16, 1), 0.75, torch.Generator().manual_seed(1))
    latents = torch.randn(2, 1 + 4, 32)
    dec(latents, ids_keep)
    seen = dec.blocks[0].seen  # [B, 1 + N_vis + K, D_dec]
    grid = M.sincos_pos_embed(32, 4)[0]  # [1 + 16, D]: row 0 the cls slot (zeros), row 1 + i patch i
    with torch.no_grad():
        embedded = dec.decoder_embed(latents)
    assert seen.shape == (2, 1 + 4 + 16, 32)
    for b in range(2):
        torch.testing.assert_close(seen[b, 0], embedded[b, 0] + grid[0], rtol=0, atol=1e-6)
        for j, i in enumerate(ids_keep[b].tolist()):  # latent j is patch i: it must carry patch i's position
            torch.testing.assert_close(seen[b, 1 + j], embedded[b, 1 + j] + grid[1 + i], rtol=0, atol=1e-6)
        for q in range(16):  # anchor q is the centre of patch q (column q % 4, row q // 4)
            torch.testing.assert_close(seen[b, 5 + q], dec.queries[0, q].detach() + grid[1 + q], rtol=0, atol=1e-6)


def test_anchored_centres_are_tanh_of_raw_plus_atanh_of_the_anchor():
    torch.manual_seed(0)
    net = M.GMAE(config())
    with torch.no_grad():
        net.decoder.head.weight.zero_()
        net.decoder.head.bias.zero_()
    g, _ = net.gaussians(torch.rand(2, 3, 16, 16))
    anchors = [(CENTRES[j % 4], CENTRES[j // 4]) for j in range(16)]
    # raw 0: each Gaussian sits on its own anchor
    torch.testing.assert_close(g[0, :, 0:2], torch.tensor(anchors), rtol=0, atol=1e-6)
    with torch.no_grad():
        net.decoder.head.bias[0:2] = torch.tensor([0.3, -0.2])
    g, _ = net.gaussians(torch.rand(2, 3, 16, 16))
    moved = [(math.tanh(0.3 + math.atanh(x)), math.tanh(-0.2 + math.atanh(y))) for x, y in anchors]
    torch.testing.assert_close(g[1, :, 0:2], torch.tensor(moved), rtol=0, atol=1e-6)  # offset added in logit space


def test_several_gaussians_per_token_start_on_their_tokens_sub_grid():
    # K = 16 from 4 tokens of g = 4: token t sits at (+-0.5, +-0.5) and its 4 Gaussians at the centres of its
    # 2 x 2 sub-cells, t +- 0.25 (raster order inside the token, x fastest).
    torch.manual_seed(0)
    net = M.GMAE(config(gaussians_per_token=4))
    with torch.no_grad():
        net.decoder.head.weight.zero_()
        net.decoder.head.bias.zero_()
    g, _ = net.gaussians(torch.rand(1, 3, 16, 16))
    expected = [(tx + dx, ty + dy) for ty in (-0.5, 0.5) for tx in (-0.5, 0.5) for dy in (-0.25, 0.25)
                for dx in (-0.25, 0.25)]
    torch.testing.assert_close(g[0, :, 0:2], torch.tensor(expected), rtol=0, atol=1e-6)
    q = M.sincos_embed_2d(32, torch.tensor([0.5, 2.5, 0.5, 2.5]), torch.tensor([0.5, 0.5, 2.5, 2.5]))
    torch.testing.assert_close(net.decoder.query_pos[0], q.float(), rtol=0, atol=1e-6)  # tokens in patch-grid units
