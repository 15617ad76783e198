"""train.py: the loss falls, checkpoints round-trip, bad flags and NaN losses stop with clear messages."""
import json
import os

import pytest
import torch

import engine
import model as M
import train
from cli import cli_error

TINY = ["--img-size", "16", "--patch", "4", "--gaussians", "32", "--n-synthetic", "160", "--batch-size", "16",
        "--lr", "2e-3", "--warmup-epochs", "0.3", "--splat", "torch"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_thirty_steps_on_synthetic_data_lower_the_loss(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "3", "--out", out])  # 160 / 16 = 10 steps per epoch
    log = read_log(out)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert os.path.isfile(os.path.join(out, "checkpoint.pt"))
    assert os.path.isfile(os.path.join(out, "recon_epoch003.png"))


def test_mae_baseline_trains_through_the_same_script(tmp_path):
    out = str(tmp_path / "mae")
    train.main(TINY + ["--decoder", "pixels", "--epochs", "2", "--out", out])
    log = read_log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"]


def test_checkpoint_resume_round_trips(tmp_path):
    out = str(tmp_path / "run")
    model = train.main(TINY + ["--epochs", "1", "--out", out])
    loaded, ckpt = engine.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["epoch"] == 0 and ckpt["step"] == 10 and ckpt["config"] == model.cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert "state" in ckpt["optimizer"] and len(ckpt["optimizer"]["state"]) > 0
    assert not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))

    resumed = train.main(TINY + ["--epochs", "2", "--out", out, "--resume"])
    assert [r["epoch"] for r in read_log(out)] == [1, 2]
    ckpt2 = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt2["epoch"] == 1 and ckpt2["step"] == 20
    assert not torch.equal(resumed.decoder.queries, model.decoder.queries)  # it trained on


def test_resume_and_load_without_checkpoint_say_how_to_make_one(tmp_path, capsys):
    assert "make one with `python train.py --out" in cli_error(capsys, train.main,
                                                               TINY + ["--out", str(tmp_path / "none"), "--resume"])


def test_resume_with_other_flags_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out, "--max-steps", "2"])
    argv = TINY[:4] + ["--gaussians", "8"] + TINY[6:] + ["--epochs", "2", "--out", out, "--resume"]
    assert "differs from the flags" in cli_error(capsys, train.main, argv)


@pytest.mark.parametrize("flags, message", [
    (["--gaussians", "0"], "--gaussians must be in 1..4096, got 0"),
    (["--mask", "1.0"], "--mask must be in"),
    (["--img-size", "18"], "not divisible by patch size"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, flags, message):
    assert message in cli_error(capsys, train.main, TINY + flags + ["--out", str(tmp_path)])
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_nan_loss_stops_and_names_the_step(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_forward = train.GMAE.forward
    calls = {"n": 0}

    def forward(self, imgs, *args, **kw):
        result = real_forward(self, imgs, *args, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(train.GMAE, "forward", forward)
    assert cli_error(capsys, train.main, TINY + ["--epochs", "1", "--out", out]).startswith("loss is nan at step 3")


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [train.lr_at(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.1)


def test_weight_decay_skips_biases_norms_and_tokens():
    model = train.GMAE(train.config_from_args(train.get_args(TINY)))
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.queries" in no_decay_names and "encoder.cls_token" in no_decay_names
    assert "encoder.blocks.0.norm1.weight" in no_decay_names and "decoder.head.bias" in no_decay_names
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_trains_on_an_image_folder(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for cls in ["cats", "dogs"]:
        for split in ["train", "val"]:
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(10):
                pixels = (torch.rand(20, 24, 3, generator=rng) * 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = str(tmp_path / "run")
    train.main(TINY + ["--data", str(tmp_path / "data"), "--epochs", "1", "--out", out])
    assert read_log(out)[0]["step"] == 20 // 16
    assert os.path.isfile(os.path.join(out, "recon_epoch001.png"))


def test_flag_defaults_are_the_tiny_preset_and_the_paper_command_is_the_paper_preset():
    assert train.config_from_args(train.get_args([])) == M.GMAEConfig.preset("tiny")
    paper = ["--model", "base", "--img-size", "224", "--patch", "16", "--gaussians", "512", "--scale-max", "1",
             "--loss-on", "masked", "--no-center-depth", "--no-anchors", "--gaussians-per-token", "1"]  # docstring
    assert train.config_from_args(train.get_args(paper)) == M.GMAEConfig.preset("base", **M.PAPER)
    assert M.GMAEConfig.preset("base", **M.PAPER).enc_dim == 768 and M.PAPER["num_gaussians"] == 512
