"""The MAE baseline's decoder (model.PixelDecoder) puts every token back at its own patch, and the pixel loss of
the whole MAE model is the mean squared error over the pixels of the masked patches, computed here by hand.

    decoder input, position i (patch order):  embed(latent of patch i) + pos_i   if patch i is visible
                                              mask_token + pos_i                  if it is masked
With identity maps for the embedding, the blocks, the norm and the head, the decoder's output at patch i is
exactly that: the unshuffle (ids_restore) is the only thing that moves tokens.

Run:  pytest -q tests/test_mae_decoder.py
"""
import pytest
import torch
import torch.nn as nn

import model as M

P = 4 * 4 * 3  # pixels of a 4 x 4 RGB patch: the head's width, so an identity head fits


def identity_decoder(cfg):
    dec = M.PixelDecoder(cfg)
    with torch.no_grad():
        dec.decoder_embed.weight.copy_(torch.eye(P))
        dec.decoder_embed.bias.zero_()
        dec.head.weight.copy_(torch.eye(P))
        dec.head.bias.zero_()
        dec.mask_token.copy_(torch.full((1, 1, P), 7.0))  # far from every latent below
    dec.blocks = nn.ModuleList()  # no blocks: the identity
    dec.norm = nn.Identity()
    return dec


def test_pixel_decoder_puts_each_visible_latent_at_its_own_patch_and_mask_tokens_elsewhere():
    cfg = M.GMAEConfig(img_size=16, patch_size=4, enc_dim=P, enc_depth=1, enc_heads=4, dec_dim=P, dec_depth=1,
                       dec_heads=4, decoder="pixels")
    dec = identity_decoder(cfg)
    B, N = 3, 16
    _, mask, ids_restore, ids_keep = M.random_masking(torch.zeros(B, N, 1), 0.75, torch.Generator().manual_seed(0))
    latents = torch.rand(B, 1 + 4, P, generator=torch.Generator().manual_seed(1))  # cls + 4 visible, shuffled order
    out = dec(latents, ids_restore)  # [B, N, P]
    pos = dec.decoder_pos_embed[0, 1:]  # [N, P]: position i belongs to patch i
    assert out.shape == (B, N, P)
    for b in range(B):
        visible = ids_keep[b].tolist()
        assert sorted(visible) == [i for i in range(N) if mask[b, i] == 0]
        for i in range(N):
            token = latents[b, 1 + visible.index(i)] if i in visible else torch.full((P,), 7.0)
            torch.testing.assert_close(out[b, i], token + pos[i], rtol=0, atol=1e-6)


def test_pixel_decoder_of_an_unshuffled_mask_keeps_the_token_order():
    # With the identity permutation, visible tokens are patches 0..3 in order: a hand-checkable special case.
    cfg = M.GMAEConfig(img_size=16, patch_size=4, enc_dim=P, enc_depth=1, enc_heads=4, dec_dim=P, dec_depth=1,
                       dec_heads=4, decoder="pixels")
    dec = identity_decoder(cfg)
    latents = torch.rand(1, 5, P)
    ids_restore = torch.arange(16)[None]
    out = dec(latents, ids_restore) - dec.decoder_pos_embed[0, 1:]
    torch.testing.assert_close(out[0, :4], latents[0, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 4:], torch.full((12, P), 7.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_mae_pixel_loss_is_the_mse_over_the_masked_patches_by_hand(loss_on):
    torch.manual_seed(0)
    cfg = M.GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                       dec_heads=2, decoder="pixels", loss_on=loss_on)
    net = M.GMAE(cfg)
    imgs = torch.rand(2, 3, 16, 16)
    out = net(imgs, generator=torch.Generator().manual_seed(3))
    pred, mask = out["pred"].detach().double(), out["mask"]
    assert mask.shape == (2, 16) and mask.sum().item() == 2 * 12
    err, count = 0.0, 0
    for b in range(2):
        for i in range(16):
            if loss_on == "masked" and mask[b, i] == 0:
                continue
            r, c = divmod(i, 4)  # patch i: row r, column c of the 4 x 4 grid (raster order)
            d = pred[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] - imgs[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].double()
            err += (d ** 2).sum().item()
            count += d.numel()
    assert count == (2 * 12 if loss_on == "masked" else 2 * 16) * 48
    assert out["loss"].item() == pytest.approx(err / count, rel=1e-5)
