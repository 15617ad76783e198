"""torchrun when one process's shard runs out early: whole batches of unreadable files are read past, so a shard can
end before the others. Every process must then end the epoch at the same step; one that left alone would leave the
others waiting in DDP's collectives for ever (gloo's default timeout is 30 minutes).

Two gloo processes on the CPU, launched by `python -m torch.distributed.run` under a timeout, so that a hang fails
the test instead of hanging CI. Each process prints how many training forwards it ran.

Run:  pytest -q tests/test_ranks.py
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import engine
import model as M
import splat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKEND = "cpu" if "cpu" in splat.available_backends() else "torch"
SMALL_CONFIG = M.GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1,
                            dec_heads=2, num_gaussians=8)
TIMEOUT_S = 240  # a healthy run takes well under a minute; the CPU may be shared

RUNNER = """
import atexit, os, sys
sys.path.insert(0, {root!r})
import model, {script}
calls = [0]
real_forward = {cls}.forward
def forward(self, *args, **kw):
    calls[0] += self.training
    return real_forward(self, *args, **kw)
{cls}.forward = forward
atexit.register(lambda: print(f"rank {{os.environ['RANK']}}: {{calls[0]}} training forwards", flush=True))
{script}.main(sys.argv[1:])
"""


def torchrun(tmp_path, script, cls, args):
    """Run `script`.main(args) in 2 gloo processes; returns (stdout, [training forwards of rank 0, rank 1]).
    A run still going after TIMEOUT_S fails the test; torchrun is told to stop its workers (SIGTERM: it passes
    the signal on, then SIGKILLs them 30 s later), which run in sessions of their own."""
    runner = tmp_path / f"run_{script}.py"
    runner.write_text(RUNNER.format(root=ROOT, script=script, cls=cls))
    logs = {name: tmp_path / f"{script}.{name}" for name in ("out", "err")}  # files, not pipes: nothing to block on
    with open(logs["out"], "w") as out, open(logs["err"], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(runner)] + args, stdout=out, stderr=err)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail(f"{script}.py under torchrun hung: no exit after {TIMEOUT_S} s. Output:\n"
                        f"{logs['out'].read_text()[-1500:]}")
    stdout = logs["out"].read_text()
    assert proc.returncode == 0, logs["err"].read_text()[-3000:]
    counts = dict(re.findall(r"rank (\d): (\d+) training forwards", stdout))
    return stdout, [int(counts["0"]), int(counts["1"])]


def break_shard(paths, dataset, rank, keep):
    """Overwrite the files `rank` of 2 reads in the first epoch (seed 0) with bytes no decoder reads, all but its
    first `keep` items; paths[i] is item i's file."""
    sampler = data.ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)
    sampler.set_epoch(0)
    for i in list(sampler)[keep:]:
        with open(paths[i], "wb") as f:
            f.write(b"broken")


def noise_png(path, rng, size=20):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype="uint8")).save(path)


@pytest.mark.filterwarnings("ignore::data.BrokenImageWarning")
def test_pretraining_ranks_end_an_epoch_together_when_one_shard_runs_out(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"  # a flat folder: --val-fraction of it is held out for validation
    folder.mkdir()
    for i in range(80):
        noise_png(folder / f"{i:03d}.png", rng)
    train_set = data.build_dataset(str(folder), 16, train=True)
    break_shard(train_set.samples, train_set, rank=1, keep=8)  # rank 1: 2 readable batches of 4, then none
    out = str(tmp_path / "run")
    args = ["--data", str(folder), "--img-size", "16", "--patch", "4", "--gaussians", "16", "--batch-size", "4",
            "--lr", "2e-3", "--warmup-epochs", "0.5", "--splat", BACKEND, "--val-size", "4", "--epochs", "2",
            "--out", out]
    stdout, forwards = torchrun(tmp_path, "train", "model.GMAE", args)
    steps_per_epoch = int(re.search(r"(\d+) steps/epoch", stdout).group(1))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[0]["step"] == 2 < steps_per_epoch  # epoch 1 ended where rank 1's shard did, on both ranks
    assert forwards == [log[-1]["step"]] * 2  # both ranks took every step of the run, and no other
    assert engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == log[-1]["step"]


@pytest.mark.filterwarnings("ignore::data.BrokenImageWarning")
def test_finetuning_ranks_end_an_epoch_together_when_one_shard_runs_out(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                noise_png(tmp_path / "data" / split / c / f"{i:02d}.png", rng)
    train_set, _, _ = data.labelled_splits(str(tmp_path / "data"), 16)
    break_shard([p for p, _ in train_set.samples], train_set, rank=1, keep=4)  # rank 1: one readable batch of 4
    cfg = SMALL_CONFIG
    pretrained = M.GMAE(cfg)
    ckpt = str(tmp_path / "checkpoint.pt")
    engine.save_checkpoint(ckpt, pretrained, torch.optim.AdamW(pretrained.parameters()), cfg, 0, 0)
    out = tmp_path / "ft"
    _, forwards = torchrun(tmp_path, "finetune", "finetune.Classifier",
                           ["--ckpt", ckpt, "--data", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "4",
                            "--out", str(out)])
    # 48 images / (batch 4 x 2 processes) = 6 steps per epoch. Epoch 1 ends with rank 1's one readable batch;
    # in epoch 2 (another permutation) the broken files are spread thin and no shard runs out.
    assert forwards == [1 + 6, 1 + 6]
    result = json.loads((out / "finetune.json").read_text())
    assert len(result["history"]) == 2 and all(0 < r["train_loss"] < 10 for r in result["history"])


@pytest.mark.filterwarnings("ignore::data.BrokenImageWarning")
def test_a_finetuning_epoch_without_a_readable_batch_is_a_clear_error(tmp_path):
    import finetune

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                if split == "train":
                    (tmp_path / split / c / f"{i}.png").write_bytes(b"broken")
                else:
                    noise_png(tmp_path / split / c / f"{i}.png", np.random.default_rng(i))
    train_set, val_set, _ = data.labelled_splits(str(tmp_path), 16)
    cfg = SMALL_CONFIG
    with pytest.raises(ValueError, match="epoch 1: no training step could be taken"):
        finetune.finetune(M.Encoder(cfg), cfg, train_set, val_set, str(tmp_path / "ft"), epochs=1, batch_size=4)
