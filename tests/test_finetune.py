"""finetune.py: layer-decay multipliers and the lr each group gets (in the training loop itself), drop path,
mixup / cutmix soft labels, one-line command-line errors, and a short run that beats chance.

    lr of a group = lr_at(step) * layer_decay^(depth + 1 - layer)      (engine.set_lr with its "lr_scale")
    drop path: each sample's residual branch is zeroed with probability p, else scaled by 1 / (1 - p)
    mixup: x = lam x + (1 - lam) x_rev,  target = lam y + (1 - lam) y_rev,  y = smooth_one_hot(label)

Shapes: B batch, C classes.
Try it: python -m pytest -q tests/test_finetune.py
"""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import engine
import finetune
import model as M
from cli import cli_error
from data import labelled_splits
from labelled_folders import colour_folder


def small_config(**kw):
    base = dict(img_size=16, patch_size=4, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1,
                dec_heads=2, num_gaussians=8)
    return M.GMAEConfig(**{**base, **kw})


def test_layer_decay_groups_get_the_documented_multipliers():
    clf = finetune.Classifier(M.Encoder(small_config()), 32, 4)  # depth 2: layers 0 (embeddings), 1, 2, 3 (head)
    groups = finetune.layer_decay_groups(clf, weight_decay=0.05, layer_decay=0.5, depth=2)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == scale["encoder.cls_token"] == 0.125  # 0.5^3
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.25 and scale["encoder.blocks.1.mlp.fc2.bias"] == 0.5
    assert scale["encoder.norm.weight"] == scale["head.weight"] == 1.0
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05 and wd["encoder.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["encoder.cls_token"] == 0.0 and wd["head.weight"] == 0.05
    assert "encoder.pos_embed" not in scale  # fixed sin-cos, never trained
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in clf.parameters())


def test_each_layer_decay_group_gets_the_scheduled_lr_times_its_scale():
    clf = finetune.Classifier(M.Encoder(small_config()), 32, 4)
    groups = finetune.layer_decay_groups(clf, weight_decay=0.05, layer_decay=0.65, depth=2)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1.0)
    lr = engine.lr_at(7, 40, 4, 3e-3, 1e-6)
    engine.set_lr(opt, lr)
    for g in opt.param_groups:  # the same product, to the bit, as the loop that set g["lr"] by hand before
        assert g["lr"] == lr * g["lr_scale"] and g["lr_scale"] in (0.65 ** 3, 0.65 ** 2, 0.65, 1.0)
    assert max(g["lr"] for g in opt.param_groups) == lr  # the head and final norm: scale 1


def hand_layer(name, depth):
    """The layer of a Classifier parameter, written out: 0 embeddings, i + 1 block i, depth + 1 norm and head."""
    if name.startswith(("encoder.patch_embed.", "encoder.cls_token")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    assert name.startswith(("encoder.norm.", "head.")), name
    return depth + 1


def test_the_training_loop_gives_each_group_the_scheduled_lr_times_its_layer_decay(tmp_path, monkeypatch):
    # Spy on every AdamW step that finetune() takes: the lr each group holds at that moment is what it trains with.
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([(g["lr"], {id(p) for p in g["params"]}) for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    cfg = small_config()
    torch.manual_seed(0)
    encoder = M.Encoder(cfg)
    train_set, val_set, _ = labelled_splits("synthetic", 16, n_train=16, n_val=8)
    finetune.finetune(encoder, cfg, train_set, val_set, str(tmp_path), epochs=3, warmup_epochs=1, batch_size=8,
                      blr=0.64, min_lr=1e-4, layer_decay=0.5, mixup=0.0, cutmix=0.0)
    layer_of = {id(p): hand_layer("encoder." + n, 2) for n, p in encoder.named_parameters() if p.requires_grad}
    peak, total, warmup = 0.64 * 8 / 256, 3 * 2, 2  # 16 images / batch 8: 2 steps per epoch
    assert len(seen) == total
    for step, groups in enumerate(seen):
        if step < warmup:
            scheduled = peak * step / warmup
        else:
            scheduled = 1e-4 + (peak - 1e-4) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for lr, params in groups:
            layers = {layer_of.get(p, 3) for p in params}  # not in the encoder: the head, layer depth + 1 = 3
            assert len(layers) == 1
            assert lr == pytest.approx(scheduled * 0.5 ** (3 - layers.pop()), rel=1e-12, abs=1e-15)
    # every layer took part: 0.125, 0.25, 0.5 and 1 times the schedule
    assert {round(lr / seen[3][-1][0], 6) for lr, _ in seen[3]} >= {0.125, 0.25, 0.5, 1.0}


class Constant(nn.Module):
    """A residual branch that ignores its input and returns `value` everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def block_with_constant_branches(drop_path):
    blk = M.Block(4, 1, drop_path=drop_path)
    blk.attn, blk.mlp = Constant(1.0), Constant(2.0)  # out = x + d1 * 1 + d2 * 2: each branch readable
    return blk


def test_drop_path_drops_whole_samples_at_the_asked_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    B, p = 8000, 0.25
    out = block_with_constant_branches(p).train()(torch.zeros(B, 3, 4))  # [B, tokens, channels]
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))  # one decision per sample: all tokens, channels
    kept = 1 / (1 - p)
    attn_on = torch.isclose(per_sample, torch.tensor(kept)) | torch.isclose(per_sample, torch.tensor(3 * kept))
    mlp_on = torch.isclose(per_sample, torch.tensor(2 * kept)) | torch.isclose(per_sample, torch.tensor(3 * kept))
    assert (attn_on | mlp_on | (per_sample == 0)).all()  # each branch is 0 or its value / (1 - p), nothing else
    std = math.sqrt(p * (1 - p) / B)  # 0.0048
    assert abs((~attn_on).float().mean().item() - p) < 4 * std and abs((~mlp_on).float().mean().item() - p) < 4 * std
    assert abs((~attn_on & ~mlp_on).float().mean().item() - p * p) < 4 * math.sqrt(p * p / B)  # independent draws
    assert per_sample.mean().item() == pytest.approx(3.0, abs=0.05)  # E[out] = 1 + 2: the expectation is kept


def test_drop_path_is_off_in_eval_and_at_rate_zero():
    x = torch.randn(64, 3, 4)
    assert torch.equal(block_with_constant_branches(0.5).eval()(x), x + 1 + 2)
    assert torch.equal(block_with_constant_branches(0.0).train()(x), x + 1 + 2)
    cfg = small_config(enc_depth=3)
    enc = M.Encoder(cfg, drop_path=0.2)
    assert [b.drop_path for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])  # linear in depth, as MAE
    plain = M.Encoder(cfg)
    plain.load_state_dict(enc.state_dict())
    torch.manual_seed(0)
    imgs = torch.rand(16, 3, 16, 16)

    def latents(encoder):  # mask 0 still shuffles the token order: the same seed, the same order, the same sums
        return encoder(imgs, 0.0, torch.Generator().manual_seed(0))[0]

    assert torch.equal(latents(enc.eval()), latents(plain.eval()))
    assert (latents(enc.train()) - latents(plain.train())).abs().max() > 1e-3  # drop path at work


def test_label_smoothing_puts_the_documented_mass_on_each_class():
    y = finetune.smooth_one_hot(torch.tensor([2, 0]), 10, 0.1)
    assert y[0, 2] == pytest.approx(0.91) and y[0, 0] == pytest.approx(0.01) and y[1, 0] == pytest.approx(0.91)
    assert torch.allclose(y.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_give_soft_labels_that_sum_to_one_and_match_the_pixels(mixup, cutmix):
    torch.manual_seed(0)
    imgs = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16)  # image i is the constant i
    labels = torch.arange(8)
    for _ in range(5):
        mixed, targets = finetune.mix_batch(imgs, labels, 8, mixup, cutmix, smoothing=0.0)
        assert torch.allclose(targets.sum(dim=1), torch.ones(8))
        lam = targets[0, 0].item()  # image 0 mixed with image 7
        assert targets[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
        # the share of image 0 in the mixed pixels is lam: mean pixel = lam * 0 + (1 - lam) * 7, exactly
        assert mixed[0].mean().item() == pytest.approx(7 * (1 - lam), abs=1e-5)
    _, smoothed = finetune.mix_batch(imgs, labels, 8, mixup, cutmix, smoothing=0.1)
    assert torch.allclose(smoothed.sum(dim=1), torch.ones(8)) and smoothed.min() >= 0.1 / 8 - 1e-6


def test_finetune_beats_chance_and_keeps_best_and_last(tmp_path):
    data = colour_folder(tmp_path / "colours", n_train=32)
    cfg = small_config(decoder="pixels")
    torch.manual_seed(0)
    model = M.GMAE(cfg)
    engine.save_checkpoint(str(tmp_path / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), cfg, 0, 0)
    args = ["--ckpt", str(tmp_path / "checkpoint.pt"), "--data", data, "--epochs", "3", "--batch-size", "16",
            "--blr", "2e-2", "--warmup-epochs", "0.5", "--mixup", "0", "--cutmix", "0"]
    result = finetune.main(args)  # 3 epochs x 8 steps
    assert result["best"]["top1"] >= 75.0  # chance: 25
    out = tmp_path / "finetune"
    for name in ("finetune_best.pt", "finetune_last.pt", "finetune.json"):
        assert os.path.isfile(out / name)
    assert sorted(os.listdir(out)) == ["finetune.json", "finetune_best.pt", "finetune_last.pt"]  # no .tmp left
    with open(out / "finetune.json") as f:
        assert json.load(f)["best"]["top1"] == result["best"]["top1"]
    enc, _ = engine.load_encoder(str(out / "finetune_best.pt"))  # a fine-tuned encoder reads back for probing
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)

    scratch = finetune.main(args + ["--from-scratch", "--epochs", "1"])
    assert scratch["from_scratch"] and os.path.isfile(tmp_path / "finetune_scratch" / "finetune_last.pt")


def test_bad_flags_and_missing_inputs_stop_with_one_line(tmp_path, capsys):
    assert cli_error(capsys, finetune.main, ["--layer-decay", "1.5"]) == "--layer-decay must be in (0, 1], got 1.5"
    msg = cli_error(capsys, finetune.main, ["--ckpt", str(tmp_path / "none.pt")])
    assert msg.startswith(f"no checkpoint at {tmp_path / 'none.pt'}: make one with `python train.py")
    data = colour_folder(tmp_path / "colours")  # 4 x 16 training images
    msg = cli_error(capsys, finetune.main, ["--ckpt", str(tmp_path / "none.pt"), "--from-scratch", "--data", data,
                                            "--batch-size", "100"])
    assert msg == "the training split has 64 images, fewer than --batch-size 100 x 1 processes"


def test_build_encoder_raises_typed_errors_and_sizes_a_scratch_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="make one with `python train.py"):
        finetune.build_encoder(str(tmp_path / "none.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(engine.CheckpointError, match="not a checkpoint written by train.py"):
        finetune.build_encoder(str(tmp_path / "other.pt"), from_scratch=True)
    enc, cfg = finetune.build_encoder(str(tmp_path / "none.pt"), from_scratch=True, img_size=32, drop_path=0.2)
    assert cfg.img_size == 32 and enc.pos_embed.shape[1] == 1 + (32 // cfg.patch_size) ** 2
    assert enc.blocks[-1].drop_path == pytest.approx(0.2)  # stochastic depth rises to drop_path in the last block
    assert finetune.default_out("runs/a/checkpoint.pt", True) == "runs/a/finetune_scratch"
