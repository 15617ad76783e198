"""Nothing a user has is lost: a table of mistaken commands, each run as a user would (a subprocess), must stop
with a nonzero exit and one line that says what to do (no traceback), and leave every file that was there before
byte for byte as it was: runs, checkpoints, photos, results. Keep adding rows.

Then, in process: a failed write (disk full) leaves the old file and no .tmp; log.jsonl never holds an epoch its
checkpoint does not; --overwrite starts over and deletes only the old run's files; study.py render with a broken
result file changes no page.

Run:  pytest -q tests/test_nothing_lost.py
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import engine
import study
import train
import zeroshot_eval
from model import GMAE, GMAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                 dec_heads=2, num_gaussians=16)
TINY = ["--model", "tiny", "--img-size", "16", "--patch", "4", "--gaussians", "16", "--epochs", "1", "--batch-size",
        "8", "--n-synthetic", "16", "--val-size", "4", "--device", "cpu", "--splat", "torch"]


def user_files(tmp):
    """Write what a user has: photos, a finished run (checkpoint, log), a fine-tuning, a probe result, notes."""
    rng = np.random.default_rng(0)
    (tmp / "photos" / "sub").mkdir(parents=True)
    for rel in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp / "photos" / rel)
    (tmp / "run").mkdir()
    torch.manual_seed(0)
    torch.save({"model": GMAE(CFG).state_dict(), "config": asdict(CFG), "data": "photos"}, tmp / "run" / "checkpoint.pt")
    (tmp / "run" / "log.jsonl").write_text('{"epoch": 1, "step": 2}\n')
    (tmp / "run" / "finetune").mkdir()
    (tmp / "run" / "finetune" / "finetune_best.pt").write_bytes(b"a fine-tuned model")
    (tmp / "notes.json").write_text('{"mine": "not a probe result"}')
    (tmp / "a_file").write_text("a file where a folder is asked for")


def snapshot(tmp):
    """{relative path: sha256} of every file under tmp."""
    return {os.path.relpath(os.path.join(d, f), tmp): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(tmp) for f in files}


# (script and flags with {tmp}, a piece of the one-line message)
CASES = [
    ("train.py --out {tmp}/run", "already holds a run (checkpoint.pt, log.jsonl): --resume continues it, --overwrite"),
    ("train.py --out {tmp}/run --resume --overwrite", "give one of them"),
    ("train.py --out {tmp}/a_file", "is a file; give a folder"),
    ("train.py --out {tmp}/a_file/run", "is a file, so nothing can be made under it"),
    ("train.py --data {tmp}/photos --out {tmp}/photos/run", "is inside the input"),
    ("finetune.py --ckpt {tmp}/run/checkpoint.pt --data synthetic", "already holds a run (finetune_best.pt)"),
    ("probe.py --ckpt {tmp}/run/checkpoint.pt --out {tmp}/run/checkpoint.pt", "is the input"),
    ("probe.py --ckpt {tmp}/run/checkpoint.pt --out {tmp}/run", "is a folder; give a file"),
    ("probe.py --ckpt {tmp}/run/checkpoint.pt --out {tmp}/notes.json", "is not a result of this command; it is kept"),
    ("zeroshot.py edges {tmp}/photos --ckpt {tmp}/run/checkpoint.pt --out {tmp}/photos", "is the input"),
    ("zeroshot.py edges {tmp}/photos --ckpt {tmp}/run/checkpoint.pt --out {tmp}/photos/sub", "is inside the input"),
    ("zeroshot.py edges {tmp}/photos/a.png --ckpt {tmp}/run/checkpoint.pt --out {tmp}/photos",
     "the output " + "{tmp}/photos/a.png is one of the inputs"),
    ("zeroshot.py edges {tmp}/run/../photos/sub --ckpt {tmp}/run/checkpoint.pt --out {tmp}/photos/sub/../sub",
     "is the input"),
    ("zeroshot.py recon {tmp}/photos/a.png --ckpt {tmp}/run/checkpoint.pt --out {tmp}/run/checkpoint.pt",
     "is a file; give a folder"),
]


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_a_mistaken_command_stops_in_one_line_and_changes_nothing(tmp_path, command, message):
    user_files(tmp_path)
    refused(tmp_path, command, message)


def refused(tmp_path, command, message):
    """Run command (script and flags, {tmp} = tmp_path) as a user would; assert a nonzero exit with one line holding
    message and no traceback, and every file under tmp_path as it was, nothing added."""
    before = snapshot(tmp_path)
    script, *flags = command.format(tmp=tmp_path).split()
    argv = [sys.executable, os.path.join(ROOT, script), *(TINY if script == "train.py" else []), *flags]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert message.format(tmp=tmp_path) in lines[-1] and "error: " in lines[-1], lines[-3:]
    after = snapshot(tmp_path)
    assert {path: after.get(path) for path in before} == before  # every file as it was
    assert set(after) == set(before), set(after) - set(before)  # and nothing written beside them


def test_a_second_run_on_a_folder_in_use_is_refused_not_raced(tmp_path):
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "run"), *TINY,
                              "--epochs", "100"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # until the first run holds the folder
            if (tmp_path / "run").is_dir():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        second = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "run"),
                                 "--overwrite", *TINY], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert second.returncode == 2 and "is in use by another run" in second.stderr.strip().splitlines()[-1]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_failed_write_leaves_the_old_file_and_no_junk(tmp_path, monkeypatch):
    path = tmp_path / "page.md"
    path.write_text("the old page")

    def full_disk(f):
        f.write(b"half of the new pa")
        raise OSError(28, "No space left on device")

    with pytest.raises(engine.OutputError, match=r"could not write .*page.md: No space left on device"):
        engine.write_whole(path, full_disk)
    assert path.read_text() == "the old page" and os.listdir(tmp_path) == ["page.md"]


def test_overwrite_starts_over_deleting_only_the_old_runs_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "log.jsonl", "recon_epoch001.png", "recon_epoch002.png", "my_notes.txt"):
        (out / name).write_text("old")
    train.main(["--out", str(out), "--overwrite", *TINY])
    assert (out / "my_notes.txt").read_text() == "old" and not (out / "recon_epoch002.png").exists()
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_log_never_holds_an_epoch_its_checkpoint_does_not(tmp_path):
    out = tmp_path / "run"
    train.main(["--out", str(out), *TINY])
    # As if an older run had logged epoch 2 and died before its checkpoint, mid-way through a last line.
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 4, "train_loss": 0.1}\n{"epoch": 3, "st')
    train.main(["--out", str(out), "--resume", *TINY, "--epochs", "2"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["step"] == 4 and "val_loss" in records[1]
    assert engine.read_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1  # the epoch in progress was 2 (index 1)


@pytest.mark.parametrize("broken", ['{"command": "python study.py quick", "rows": [', "{}"])
def test_study_render_with_a_broken_result_changes_no_page(tmp_path, monkeypatch, broken):
    results = tmp_path / "results"
    results.mkdir()
    (results / "laptop.json").write_text(broken)
    monkeypatch.setattr(study, "RESULTS", str(results))
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    page.write_text("the old page")
    readme.write_text("intro\n<!-- study:laptop -->\nold table\n<!-- /study:laptop -->\n")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"laptop.json cannot be rendered .*run `python study.py quick --only laptop`"):
        study.render(page=str(page), readme=str(readme))
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# Data read once and paired by path


def png(path, value=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 100, 200)).save(path)
    return path


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    for i in range(4):
        png(tmp_path / "photos" / f"{i}.png", value=i)
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "loop")  # photos/loop/loop/... without end
    os.symlink(tmp_path / "photos" / "0.png", tmp_path / "photos" / "again.png")
    assert [os.path.basename(p) for p in data.list_images(str(tmp_path / "photos"))] == ["0.png", "1.png", "2.png",
                                                                                         "3.png"]


def test_tiff_gif_and_float_tiff_are_read(tmp_path):
    png(tmp_path / "a.png")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "b.gif")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "c.tif")
    Image.fromarray(np.full((6, 8), 0.5, dtype=np.float32), mode="F").save(tmp_path / "d.tiff")
    assert sorted(os.path.basename(p) for p in data.list_images(str(tmp_path))) == ["a.png", "b.gif", "c.tif", "d.tiff"]
    assert np.asarray(data.load_rgb(tmp_path / "d.tiff")).mean() == 128  # 0.5 of [0, 1], not black
    assert np.asarray(data.load_rgb(tmp_path / "c.tif"))[0, 0].tolist() == [10, 20, 30]


def test_masks_pair_by_relative_path_and_transparency_is_background(tmp_path):
    png(tmp_path / "ecssd" / "images" / "sub" / "a.jpg")
    png(tmp_path / "ecssd" / "ground_truth_mask" / "a.png")  # a mask of another image called a
    with pytest.raises(FileNotFoundError, match=r"no mask for .*sub/a.jpg: expected .*ground_truth_mask/sub/a.png"):
        zeroshot_eval.fg_items(0, 8, False, str(tmp_path / "ecssd"), None)
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the centre is opaque
    rgba[3:7, 4:8, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "mask.png")
    figure = zeroshot_eval.load_mask(tmp_path / "mask.png")
    assert figure.sum() == 16 and figure[3:7, 4:8].all()


def test_a_val_split_that_copies_train_and_a_single_class_are_refused(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                png(tmp_path / "copied" / split / c / f"{split}{i}.png", value=10 * i + (c == "dog"))
    with pytest.raises(ValueError, match=r"6 image files of .* are in both train and val .* by path or by content"):
        data.labelled_splits(str(tmp_path / "copied"), 16)
    for i in range(3):
        png(tmp_path / "one" / "train" / "cat" / f"{i}.png", value=i)
        png(tmp_path / "one" / "val" / "cat" / f"{i}.png", value=100 + i)
    with pytest.raises(ValueError, match="has one class .cat.: every answer would be right"):
        data.labelled_splits(str(tmp_path / "one"), 16)


CLI_MESSAGES = [  # a mistake, and the line that points the right way
    ("zeroshot.py edges {tmp}/photos/a.png --ckpt {tmp}/photos/b.jpg --out {tmp}/o", "not a file written by torch.save"),
    ("train.py --data {tmp}/photos/a.png --out {tmp}/o", "--data {tmp}/photos/a.png is a file; give the folder"),
    ("train.py --weight-decay nan --out {tmp}/o", "--weight-decay must be a finite number, got nan"),
    ("train.py --min-lr -1 --out {tmp}/o", "--min-lr must be in [0, inf), got -1.0"),
    ("train.py --warmup-epochs -2 --out {tmp}/o", "--warmup-epochs must be in [0, inf), got -2.0"),
    ("train.py --n-synthetic 0 --out {tmp}/o", "--n-synthetic must be in [1, inf), got 0"),
    ("train.py --mask 1.5 --out {tmp}/o", "--mask must be in [0, 1), got 1.5 (a fraction of the patches)"),
]


@pytest.mark.parametrize("command, message", CLI_MESSAGES, ids=[c for c, _ in CLI_MESSAGES])
def test_a_mistake_is_told_what_to_change(tmp_path, command, message):
    user_files(tmp_path)
    refused(tmp_path, command, message)


def test_resume_from_a_classifier_or_a_checkpoint_without_optimizer_is_one_line(tmp_path):
    user_files(tmp_path)  # run/checkpoint.pt holds weights and config only
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "run"), "--resume",
                          *TINY], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "is a checkpoint without optimizer state, not a train.py run to continue" in run.stderr.splitlines()[-1]


def test_a_file_name_that_is_not_utf8_is_read_and_named(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as old cameras and zip files leave them
    png(tmp_path / "photos" / name)
    png(tmp_path / "photos" / "b.png")
    assert [os.path.basename(p) for p in data.list_images(str(tmp_path / "photos"))] == ["b.png", name]
    digest = int.from_bytes(hashlib.sha256(b"caf\xe9.png").digest()[:8], "big")  # hashed by its bytes
    assert all(data.held_out(name, f) == (digest < f * 2**64) for f in (0.1, 0.5, 0.9))
    (tmp_path / "photos" / name).write_bytes(b"broken")
    with pytest.raises(data.BrokenImageError, match="could not read image .*caf"):
        data.load_rgb(str(tmp_path / "photos" / name))


@pytest.mark.parametrize("flags, message", [
    (["--tiles", "2"], "--tiles 2 cuts the 512 x 341 working image into 173740 windows, more than 1024; use --tiles"),
    (["--layers", "1"], "--layers 1 puts every Gaussian in one layer: edges needs two or more"),
    (["--max-size", "1"], "--max-size must be 0 (no bound) or >= 16, got 1"),
])
def test_edges_that_would_take_hours_or_mean_nothing_stop_at_once(tmp_path, flags, message):
    user_files(tmp_path)
    Image.new("RGB", (600, 400), (10, 200, 30)).save(tmp_path / "photos" / "big.png")
    started = time.time()
    refused(tmp_path, f"zeroshot.py edges {tmp_path}/photos/big.png --ckpt {tmp_path}/run/checkpoint.pt --out "
            f"{tmp_path}/o " + " ".join(flags), message)
    assert time.time() - started < 120


def test_an_empty_out_or_data_is_named():
    with pytest.raises(engine.OutputError, match="--out is empty; give a folder"):
        engine.check_output("")
    with pytest.raises(SystemExit):
        train.get_args(["--data", ""])


def test_a_result_file_in_a_folder_yet_to_be_made_is_written(tmp_path):
    engine.check_output(str(tmp_path / "new" / "deeper" / "probe.json"), folder=False)
    engine.write_whole(tmp_path / "new" / "deeper" / "probe.json", b"{}")
    assert (tmp_path / "new" / "deeper" / "probe.json").read_bytes() == b"{}"


def test_ctrl_c_in_any_script_is_one_line_and_exit_130(tmp_path):
    user_files(tmp_path)
    Image.new("RGB", (600, 400), (10, 200, 30)).save(tmp_path / "photos" / "big.png")
    argv = [sys.executable, os.path.join(ROOT, "zeroshot.py"), "edges", str(tmp_path / "photos" / "big.png"),
            "--ckpt", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "o"), "--tiles", "26"]
    run = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # torch imported, the model reading windows
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "zeroshot.py: interrupted (Ctrl-C); the files already written are whole"
