"""Several Gaussians per decoder token (GMAEConfig.gaussians_per_token = g): K Gaussians from K / g query tokens."""
import pytest
import torch
from torch.func import functional_call

import engine
import model as M
import splat
import train
from cli import cli_error


def config(**kw):
    base = dict(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2,
                num_gaussians=32)
    return M.GMAEConfig(**{**base, **kw})


def decoder_inputs(model, seed=0):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=model.encoder.cls_token.dtype)
    latents, _, _, ids_keep = model.encoder(M.normalize(x), 0.75, torch.Generator().manual_seed(seed + 1))
    return latents, ids_keep


def test_one_gaussian_per_token_is_eq1_unrolled_by_hand():
    torch.manual_seed(0)
    model = M.GMAE(config(gaussians_per_token=1))
    dec = model.decoder
    latents, ids_keep = decoder_inputs(model)
    x = dec.decoder_embed(latents)
    pos = dec.decoder_pos_embed[0]
    x = x + torch.cat([pos[:1].expand(2, 1, -1), pos[1:][ids_keep]], dim=1)  # each latent at its patch
    x = torch.cat([x, dec.queries.expand(2, -1, -1)], dim=1)  # ++ K query tokens, no mask tokens
    for blk in dec.blocks:
        x = blk(x)
    expected = dec.head(dec.norm(x[:, -32:]))  # one row of 14 per query
    assert dec.queries.shape == (1, 32, 32) and dec.head.out_features == 14
    assert torch.equal(dec(latents, ids_keep), expected)


@pytest.mark.parametrize("g", [2, 4, 8])
def test_g_gaussians_per_token_shapes_and_parameter_count(g):
    torch.manual_seed(0)
    one, many = M.GMAE(config()), M.GMAE(config(gaussians_per_token=g))
    assert many.cfg.num_queries == 32 // g and many.decoder.queries.shape == (1, 32 // g, 32)
    gaussians, _ = many.gaussians(torch.rand(3, 3, 16, 16))
    assert gaussians.shape == (3, 32, splat.PARAM_DIM)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    # fewer query tokens (32 - 32/g of width 32), a head g times as wide (14 (g - 1) more rows of 32 + bias)
    assert count(many) - count(one) == -(32 - 32 // g) * 32 + 14 * (g - 1) * (32 + 1)


def test_token_j_gives_gaussians_j_g_to_j_g_plus_g_minus_1():
    torch.manual_seed(0)
    model = M.GMAE(config(gaussians_per_token=4))
    latents, ids_keep = decoder_inputs(model)
    raw = model.decoder(latents, ids_keep)  # [2, 32, 14]
    with torch.no_grad():
        model.decoder.queries[0, 3] += 1.0  # move token 3 only: with one decoder layer the others see it too,
    moved = model.decoder(latents, ids_keep)  # so compare the head's input directly instead
    head_in = torch.zeros(1, 32)
    head_in[0, 5] = 1.0
    rows = model.decoder.head(head_in).view(4, 14)  # the 4 Gaussians a token with this feature gives
    w = model.decoder.head.weight.view(4, 14, 32)
    assert torch.allclose(rows, w[:, :, 5] + model.decoder.head.bias.view(4, 14))
    assert not torch.equal(raw[:, 12:16], moved[:, 12:16])


def test_head_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = M.GMAE(config(gaussians_per_token=4, anchors=True)).double()
    latents, ids_keep = decoder_inputs(model)
    latents = latents.double().detach()
    bias = model.decoder.head.bias.detach().clone().requires_grad_()
    weight = model.decoder.head.weight.detach().clone().requires_grad_()

    def valid_gaussians(w, b):
        raw = functional_call(model.decoder, {"head.weight": w, "head.bias": b}, (latents, ids_keep))
        return M.gaussian_activation(raw, scale_max=2.0)

    assert torch.autograd.gradcheck(valid_gaussians, (weight, bias), eps=1e-6, atol=1e-5)


def test_anchored_gaussians_of_a_token_start_spread_over_its_own_cell():
    torch.manual_seed(0)
    model = M.GMAE(config(num_gaussians=64, gaussians_per_token=4, anchors=True))  # 16 tokens on a 4 x 4 grid
    a = model.decoder.anchor_logit.tanh().view(16, 4, 2).double()  # each token's 4 starting points
    tokens = M.anchor_grid(16)  # cell centres -3/4, -1/4, 1/4, 3/4: cells of half-width 1/4
    assert torch.allclose(a.mean(1), tokens, atol=1e-6)  # spread around the token's own point
    assert torch.allclose((a - tokens[:, None]).abs(), torch.full((16, 4, 2), 0.125, dtype=torch.float64), atol=1e-6)  # 2 x 2 sub-grid
    assert len({tuple(p) for p in a.reshape(-1, 2).round(decimals=6).tolist()}) == 64  # all 64 distinct
    g, _ = model.gaussians(torch.rand(2, 3, 16, 16))
    assert (g[..., 0:2].double() - a.reshape(1, 64, 2)).abs().max() < 0.15  # and each Gaussian starts there


def test_one_per_token_anchors_are_todays_anchor_grid():
    model = M.GMAE(config(num_gaussians=16, anchors=True))
    assert torch.equal(model.decoder.anchor_logit, torch.atanh(M.anchor_grid(16)).float())


def test_k_not_a_multiple_of_g_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="--gaussians 30 is not a multiple of --gaussians-per-token 4"):
        config(num_gaussians=30, gaussians_per_token=4)
    message = cli_error(capsys, train.main, ["--gaussians", "30", "--gaussians-per-token", "4", "--out", str(tmp_path)])
    assert message.startswith("--gaussians 30 is not a multiple of --gaussians-per-token 4")


@pytest.mark.parametrize("k, g", [(16, 1), (64, 1), (96, 2), (100, 2), (512, 8), (4096, 64), (97, 1)])
def test_the_laptop_preset_keeps_at_most_64_query_tokens(k, g):
    assert M.per_token_for(k, 64) == g
    assert M.GMAEConfig.preset("tiny", num_gaussians=k).gaussians_per_token == g
    assert train.config_from_args(train.get_args(["--gaussians", str(k)])).gaussians_per_token == g


def test_checkpoints_record_g_and_old_ones_load_as_one_per_token(tmp_path):
    cfg = config(gaussians_per_token=4)
    model = M.GMAE(cfg)
    path = str(tmp_path / "checkpoint.pt")
    engine.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), cfg, 0, 0)
    loaded, ckpt = engine.load_checkpoint(path)
    assert ckpt["config"].gaussians_per_token == 4 and loaded.decoder.queries.shape == (1, 8, 32)
    old = torch.load(path, weights_only=True)
    old_cfg = config()
    old["config"] = {k: v for k, v in vars(old_cfg).items() if k != "gaussians_per_token"}  # written before g existed
    old["model"] = M.GMAE(old_cfg).state_dict()
    torch.save(old, path)
    assert engine.read_checkpoint(path)["config"].gaussians_per_token == 1
    engine.load_checkpoint(path)
