"""probe.py, engine.load_encoder and data.labelled_splits: k-NN and top-k by hand, the linear probe, checkpoints
of either decoder, other image / patch sizes, labelled splits, one-line command-line errors, the whole
script beating chance on an easy labelled folder, and the numbers of --pool mean and --random-init recomputed
from features and a k-NN written out here.

    k-NN score(c) = sum over the k most cosine-similar training features of exp(s_j / T) [label_j = c]
    LARS step of a matrix: lr * 0.001 ||w|| / ||g|| * g;   top-k: % of rows whose label is among the k highest

Shapes: M training features, V validation features, D width, C classes.
Try it: python -m pytest -q tests/test_probe.py
"""
import json
import math
from pathlib import Path

import pytest
import torch

import engine
import model as M
import probe
from cli import cli_error
from data import labelled_splits
from labelled_folders import colour_folder


def small_config(**kw):
    base = dict(img_size=16, patch_size=4, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1,
                dec_heads=2, num_gaussians=8)
    return M.GMAEConfig(**{**base, **kw})


def save_ckpt(path, cfg, seed=0):
    torch.manual_seed(seed)
    model = M.GMAE(cfg)
    engine.save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), cfg, 0, 0)
    return model


def test_knn_on_hand_made_features_gives_the_known_answer():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.2], [0.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])  # norms do not matter
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.05]])
    scores = probe.knn_scores(train, labels, test, num_classes=3, k=3, temperature=0.07)
    # first query: neighbours are train 1 (class 0), train 0 (class 0) and train 2 (class 1)
    q = torch.nn.functional.normalize(test[0], dim=0)
    cos = torch.nn.functional.normalize(train, dim=1) @ q
    expected = torch.tensor([math.exp(cos[0] / 0.07) + math.exp(cos[1] / 0.07), math.exp(cos[2] / 0.07), 0.0])
    assert torch.allclose(scores[0], expected, rtol=1e-5)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]
    assert engine.topk_accuracy(scores, torch.tensor([0, 1, 1]))["top1"] == pytest.approx(200 / 3)


def test_topk_accuracy_counts_hits_and_skips_a_trivial_top5():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, -0.1, -0.2, 0.3], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    acc = engine.topk_accuracy(scores, torch.tensor([2, 6]))
    assert acc["top1"] == 0.0 and acc["top5"] == 50.0  # row 0: label 2 ranks third; row 1: label 6 ranks last
    assert engine.topk_accuracy(scores[:, :5], torch.tensor([1, 0])) == {"top1": 100.0}  # 5 classes: no top-5


def test_lars_scales_the_step_of_a_matrix_by_its_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = probe.LARS([w, b], lr=0.5, momentum=0.9, eta=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([2.0])  # ||g|| = 2
    opt.step()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 0.5 * 0.001 * 5 / 2 * 2.0]]))  # trust 0.0025
    assert torch.allclose(b, torch.tensor([0.0]))  # 1-D: the plain SGD step 0.5 * 2


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 3
    labels = torch.arange(500) % 5
    feats = centres[labels] + torch.randn(500, 16, generator=gen)
    head = probe.train_linear_probe(feats[:400], labels[:400], 5, epochs=10, batch_size=64, warmup_epochs=1)
    assert engine.topk_accuracy(head(feats[400:]).detach(), labels[400:])["top1"] == 100.0
    assert not any(p.requires_grad for p in head[0].parameters())  # BatchNorm without affine: no parameters


def test_pixel_and_gaussian_checkpoints_load_into_the_same_encoder(tmp_path):
    save_ckpt(tmp_path / "gmae.pt", small_config(decoder="gaussians"))
    save_ckpt(tmp_path / "mae.pt", small_config(decoder="pixels"))  # same seed: the encoder is built first
    (a, cfg_a), (b, cfg_b) = engine.load_encoder(str(tmp_path / "gmae.pt")), engine.load_encoder(str(tmp_path / "mae.pt"))
    assert type(a) is type(b) is M.Encoder and cfg_a.decoder == "gaussians" and cfg_b.decoder == "pixels"
    x = torch.rand(3, 3, 16, 16)
    fa, fb = engine.encode(a.eval(), x), engine.encode(b.eval(), x)
    assert fa.shape == (3, 32) and torch.allclose(fa, fb, atol=1e-5)  # mask 0 still shuffles token order


def test_other_image_size_recomputes_the_sincos_embedding_and_other_patch_size_is_refused(tmp_path):
    model = save_ckpt(tmp_path / "ckpt.pt", small_config())
    enc, cfg = engine.load_encoder(str(tmp_path / "ckpt.pt"), img_size=32)
    assert cfg.img_size == 32 and enc.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(enc.pos_embed, M.sincos_pos_embed(32, 8))
    assert torch.equal(enc.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    assert engine.encode(enc, torch.rand(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="pretrained with patch size 4, not 8; .*--patch 8"):
        engine.load_encoder(str(tmp_path / "ckpt.pt"), patch_size=8)
    with pytest.raises(ValueError, match="image size 18 is not divisible by the checkpoint's patch size 4"):
        engine.load_encoder(str(tmp_path / "ckpt.pt"), img_size=18)


def test_missing_or_foreign_checkpoint_gives_a_clear_error(tmp_path, capsys):
    msg = cli_error(capsys, probe.main, ["--ckpt", str(tmp_path / "none" / "checkpoint.pt")])
    assert msg.startswith("no checkpoint at ") and "make one with `python train.py --out" in msg
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(engine.CheckpointError, match="not a checkpoint written by train.py"):
        engine.load_encoder(str(tmp_path / "other.pt"))
    msg = cli_error(capsys, probe.main, ["--ckpt", str(tmp_path / "other.pt")])
    assert msg == (f"{tmp_path / 'other.pt'} is not a checkpoint written by train.py or finetune.py "
                   "(no 'model' and 'config')")


def test_bad_flags_stop_with_one_line(capsys):
    msg = cli_error(capsys, probe.main, ["--knn", "0", "--epochs", "0"])
    assert msg == "--knn 0 and --epochs 0 leave nothing to evaluate"
    assert cli_error(capsys, probe.main, ["--temperature", "0"]) == "--temperature must be > 0, got 0.0"
    assert cli_error(capsys, probe.main, ["--n-val", "0"]) == "--n-val must be >= 1, got 0"


def test_labelled_splits_give_both_splits_and_refuse_unlabelled_or_mismatched_folders(tmp_path, capsys):
    train, val, classes = labelled_splits(colour_folder(tmp_path / "colours"), 16, augment=False)
    assert classes == train.classes == val.classes == ["c0", "c1", "c2", "c3"]
    assert (len(train), len(val)) == (4 * 16, 4 * 8) and train[0][0].shape == (3, 16, 16)
    train, val, classes = labelled_splits("synthetic", 16, n_train=20, n_val=10, seed=3)
    assert (len(train), len(val), len(classes)) == (20, 10, 10)

    val = Path(colour_folder(tmp_path / "flat")) / "val"  # then val/<class>/<i>.png -> val/<class>_<i>.png
    for c in ("c0", "c1", "c2", "c3"):
        for f in (val / c).iterdir():
            f.rename(val / f"{c}_{f.name}")
        (val / c).rmdir()
    with pytest.raises(ValueError, match=r"flat/val has no class folders, so no labels .*root/\{train,val\}/<class>/"):
        labelled_splits(str(tmp_path / "flat"), 16)
    colour_folder(tmp_path / "odd")
    (tmp_path / "odd" / "val" / "c3").rename(tmp_path / "odd" / "val" / "c9")
    with pytest.raises(ValueError, match=r"differ \(only in train: \['c3'\], only in val: \['c9'\]\)"):
        labelled_splits(str(tmp_path / "odd"), 16)

    save_ckpt(tmp_path / "checkpoint.pt", small_config())  # the script stops with the same message
    msg = cli_error(capsys, probe.main, ["--ckpt", str(tmp_path / "checkpoint.pt"), "--data", str(tmp_path / "odd")])
    assert msg.startswith(f"train and val classes of {tmp_path / 'odd'} differ (only in train: ['c3']")


def test_default_out_names_the_data_pool_and_init_beside_the_checkpoint():
    assert probe.default_out("runs/a/checkpoint.pt", "synthetic", "cls", False) == "runs/a/probe_synthetic.json"
    assert probe.default_out("checkpoint.pt", "/d/cifar10/", "mean", True) == "./probe_cifar10_mean_random.json"


def test_probe_script_beats_chance_on_an_easy_folder(tmp_path):
    data = colour_folder(tmp_path / "colours")
    save_ckpt(tmp_path / "checkpoint.pt", small_config())
    args = ["--ckpt", str(tmp_path / "checkpoint.pt"), "--data", data, "--epochs", "20", "--warmup-epochs", "2",
            "--batch-size", "16", "--knn", "5"]
    result = probe.main(args)
    assert result["linear"]["top1"] >= 90.0 and result["knn"]["top1"] >= 90.0  # chance: 25
    assert "top5" not in result["linear"]  # 4 classes
    with open(tmp_path / "probe_colours.json") as f:
        assert json.load(f)["knn"]["top1"] == result["knn"]["top1"]


def hand_features(encoder, dataset, pool):
    """Features [M, D] and labels [M]: the normalised cls token, or the mean of the normalised patch tokens
    (never the cls token)."""
    imgs, labels = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        tokens = encoder.eval()(M.normalize(torch.stack(imgs)))[0]  # [M, 1 + N, D]
    feats = tokens[:, 0] if pool == "cls" else tokens[:, 1:].sum(1) / (tokens.shape[1] - 1)
    return feats, torch.tensor(labels)


def hand_knn_top1(train, train_labels, val, val_labels, k, temperature=0.07):
    """Weighted k-NN top-1 in percent, written as loops (DINO's vote: exp(cosine / T) for each of the k nearest)."""
    hits = 0
    for f, y in zip(val, val_labels):
        cos = [torch.dot(f, t).item() / (f.norm().item() * t.norm().item()) for t in train]
        nearest = sorted(range(len(cos)), key=lambda j: -cos[j])[:k]
        votes = {}
        for j in nearest:
            votes[train_labels[j].item()] = votes.get(train_labels[j].item(), 0.0) + math.exp(cos[j] / temperature)
        hits += max(votes, key=votes.get) == y.item()
    return 100.0 * hits / len(val)


SYNTH = ["--n-synthetic", "48", "--n-val", "24", "--epochs", "0", "--knn", "5"]  # hard for these features: no 100 %


def test_pool_mean_scores_the_mean_patch_token(tmp_path):
    model = save_ckpt(tmp_path / "checkpoint.pt", small_config(), seed=1)
    train_set, val_set, _ = labelled_splits("synthetic", 16, n_train=48, n_val=24, augment=False)
    results = {}
    for pool in ("cls", "mean"):
        results[pool] = probe.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--pool", pool] + SYNTH)
        feats = [hand_features(model.encoder, s, pool) for s in (train_set, val_set)]
        assert results[pool]["knn"]["top1"] == pytest.approx(hand_knn_top1(*feats[0], *feats[1], k=5))
        assert results[pool]["pool"] == pool
    assert (tmp_path / "probe_synthetic_mean.json").is_file() and (tmp_path / "probe_synthetic.json").is_file()
    train_feats, _ = probe.extract_features(model.encoder, train_set, pool="mean")
    torch.testing.assert_close(train_feats, hand_features(model.encoder, train_set, "mean")[0], rtol=0, atol=1e-5)


def test_random_init_scores_an_untrained_encoder_of_the_checkpoints_size(tmp_path, monkeypatch):
    save_ckpt(tmp_path / "checkpoint.pt", small_config(), seed=1)
    probed = []
    real_probe = probe.probe
    monkeypatch.setattr(probe, "probe", lambda enc, *a, **kw: probed.append(enc) or real_probe(enc, *a, **kw))
    result = probe.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--random-init", "--seed", "3"] + SYNTH)
    torch.manual_seed(3)  # --seed: the untrained encoder's initialisation
    untrained = M.Encoder(small_config())
    trained, _ = engine.load_encoder(str(tmp_path / "checkpoint.pt"))
    used = probed[0].state_dict()
    assert all(torch.equal(used[k], v) for k, v in untrained.state_dict().items())
    assert not torch.equal(used["blocks.0.attn.qkv.weight"], trained.state_dict()["blocks.0.attn.qkv.weight"])
    train_set, val_set, _ = labelled_splits("synthetic", 16, n_train=48, n_val=24, seed=3, augment=False)
    feats = [hand_features(untrained, s, "cls") for s in (train_set, val_set)]
    assert result["knn"]["top1"] == pytest.approx(hand_knn_top1(*feats[0], *feats[1], k=5))
    assert result["random_init"] and (tmp_path / "probe_synthetic_random.json").is_file()
