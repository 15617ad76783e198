"""train.py at scale and under faults (issue 10): DDP and gradient accumulation equal one big batch, killed
runs resume bit-identically, broken image files are skipped and counted, bf16 autocast trains.

Run:  pytest -q tests/test_train_scale.py
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import data
import engine
import model as M
import splat
import train
from cli import cli_error

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKEND = "cpu" if "cpu" in splat.available_backends() else "torch"
# 64 scenes, batch 8: 8 steps per epoch; a tiny model so a step takes milliseconds.
SMALL = ["--img-size", "16", "--patch", "4", "--gaussians", "16", "--n-synthetic", "64", "--batch-size", "8",
         "--lr", "2e-3", "--warmup-epochs", "0.5", "--splat", BACKEND, "--val-size", "8", "--model", "tiny"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    return engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]


def relative_errors(grads, reference):
    """max |g - g_ref| / max |g_ref| of each pair of gradient tensors (0 where both are all zero)."""
    return [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads, reference)]


def weights_config(out):
    return engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def with_flag(args, flag, value):
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


def same_randomness_everywhere():
    """Take randomness out of what DDP changes on purpose: the masks (each process draws its own). With one fixed
    mask for every image, one process with batch 2b and two processes with batch b see the same images, masks and
    loss; the crops are the same already (each item's follow (seed, epoch, index): data.SeededItems)."""

    def first_patches_visible(x, mask_ratio, generator=None):
        B, N, D = x.shape
        n_keep = int(N * (1 - mask_ratio))
        ids_restore = torch.arange(N, device=x.device).expand(B, N)
        mask = torch.ones(B, N, device=x.device)
        mask[:, :n_keep] = 0
        return x[:, :n_keep], mask, ids_restore, ids_restore[:, :n_keep]

    M.random_masking = first_patches_visible


def record_first_gradients(path):
    """From now on, the first AdamW step of a run (rank 0's under torchrun) saves its gradients to path: DDP's
    average over processes, after clipping, in the optimizer's parameter order. Returns the hook's handle."""
    def hook(optimizer, args, kwargs):
        if not os.path.exists(path) and os.environ.get("RANK", "0") == "0":
            torch.save([p.grad.clone() for group in optimizer.param_groups for p in group["params"]], path)
    return register_optimizer_step_pre_hook(hook)


RUNNER = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import model, train
from test_train_scale import record_first_gradients, same_randomness_everywhere
if os.environ.get("SAME_RANDOMNESS"):
    same_randomness_everywhere()
if os.environ.get("FIRST_GRADIENTS"):
    record_first_gradients(os.environ["FIRST_GRADIENTS"])
kill_at = int(os.environ.get("KILL_AT_CALL", "0"))
group_at = int(os.environ.get("SIGNAL_GROUP_AT_CALL", "0"))
calls = [0]
real_forward = model.GMAE.forward
def forward(self, imgs, *args, **kw):
    calls[0] += self.training
    if calls[0] == kill_at and self.training:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: what the OOM killer or a node loss does
    if calls[0] == group_at and self.training:  # to the whole group, loader workers included: Slurm, Ctrl-C
        os.killpg(os.getpgid(0), getattr(signal, os.environ["SIGNAL_NAME"]))
    return real_forward(self, imgs, *args, **kw)
model.GMAE.forward = forward
train.main(sys.argv[1:])
"""


def run_script(tmp_path, args, nproc=1, **env):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=ROOT, tests=HERE))
    launch = [sys.executable, str(runner)]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  str(runner)]
    env = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # its own process group, which a test may signal whole


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    args = SMALL + ["--epochs", "1", "--max-steps", "4", "--mask", "0.75"]
    ddp = run_script(tmp_path, with_flag(args, "--batch-size", "4") + ["--out", str(tmp_path / "ddp")],
                     nproc=2, SAME_RANDOMNESS=1, FIRST_GRADIENTS=tmp_path / "ddp_grads.pt")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "global batch 8 = 4 x 1 accum x 2 processes" in ddp.stdout
    monkeypatch.setattr(M, "random_masking", M.random_masking)  # restored after the test
    same_randomness_everywhere()
    hook = record_first_gradients(str(tmp_path / "one_grads.pt"))
    try:
        train.main(args + ["--out", str(tmp_path / "one")])
    finally:
        hook.remove()
    # The first step's gradient: both runs start from the same weights, so the two differ only by float32
    # rounding of sums taken in another order (two half-batches averaged by DDP; another SIMD width's matmul),
    # a few 2^-24 relative roundings of each tensor's terms. Compared at each tensor's own scale. (The weights
    # after the step are no measure: AdamW divides by sqrt(v), so a near-zero gradient's rounding moves a weight
    # by up to lr, and by how much depends on the CPU's kernels: AVX-512 against AVX2.)
    grads_ddp, grads_one = torch.load(tmp_path / "ddp_grads.pt"), torch.load(tmp_path / "one_grads.pt")
    assert len(grads_ddp) == len(grads_one) == sum(p.requires_grad for p in M.GMAE(weights_config(tmp_path / "one"))
                                                   .parameters())
    errors = relative_errors(grads_ddp, grads_one)
    print(f"DDP (2 x batch 4) vs 1 process (batch 8), first step: max |g1 - g2| / max |g| = {max(errors):.1e} "
          f"over {len(errors)} tensors")
    # Measured 6.9e-7 (AVX-512, AVX2) and 5.7e-7 (ATEN_CPU_CAPABILITY=default); a gradient not averaged over
    # processes, or from another batch, is off by O(1).
    assert max(errors) < 1e-4
    assert read_log(tmp_path / "ddp")[0]["train_loss"] == pytest.approx(read_log(tmp_path / "one")[0]["train_loss"],
                                                                       rel=1e-5)
    assert not (tmp_path / "ddp" / "recon_epoch002.png").exists()  # written by rank 0 only, once per epoch
    assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoint.pt", "log.jsonl", "recon_epoch001.png"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "random_masking", M.random_masking)
    same_randomness_everywhere()
    args = SMALL + ["--epochs", "1", "--max-steps", "3"]
    for name, flags in (("big", args), ("accum", with_flag(args, "--batch-size", "4") + ["--accum-iter", "2"])):
        hook = record_first_gradients(str(tmp_path / f"{name}_grads.pt"))
        try:
            train.main(flags + ["--out", str(tmp_path / name)])
        finally:
            hook.remove()
    assert read_log(tmp_path / "accum")[0]["step"] == read_log(tmp_path / "big")[0]["step"] == 3
    assert read_log(tmp_path / "accum")[0]["train_loss"] == pytest.approx(read_log(tmp_path / "big")[0]["train_loss"],
                                                                         rel=1e-5)
    # As for DDP: the first step's gradients differ by float32 rounding only (two half-batch sums instead of one).
    errors = relative_errors(torch.load(tmp_path / "accum_grads.pt"), torch.load(tmp_path / "big_grads.pt"))
    assert max(errors) < 1e-4


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_saves_then_exits_and_resume_is_bit_identical(tmp_path, monkeypatch, workers):
    args = SMALL + ["--epochs", "2", "--workers", workers]  # crops drawn in worker processes too
    train.main(args + ["--out", str(tmp_path / "unbroken")])

    real_forward = train.GMAE.forward
    calls = {"n": 0}

    def forward(self, imgs, *a, **kw):
        calls["n"] += self.training
        if calls["n"] == 11 and self.training:  # during step 11 of 16, in epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, imgs, *a, **kw)

    monkeypatch.setattr(train.GMAE, "forward", forward)
    out = str(tmp_path / "stopped")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--out", out])
    assert stop.value.code == 128 + signal.SIGTERM
    ckpt = engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_images"]) == (1, 11, 3 * 8)  # the step finished, then saved
    assert signal.getsignal(signal.SIGTERM) is handler  # main's handler is gone again

    monkeypatch.setattr(train.GMAE, "forward", real_forward)
    train.main(args + ["--out", out, "--resume"])
    a, b = weights(tmp_path / "unbroken"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"
    log_a, log_b = read_log(tmp_path / "unbroken"), read_log(out)
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]
    assert [r["val_loss"] for r in log_a] == [r["val_loss"] for r in log_b]


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_whole_process_group_saves_exits_in_one_line_and_resumes_exactly(tmp_path, name, code):
    # Loader workers leave the group (data.leave_process_group): the signal reaches the loop, which saves and stops.
    args = SMALL + ["--epochs", "2", "--workers", "2"]
    train.main(args + ["--out", str(tmp_path / "unbroken")])
    out = str(tmp_path / "stopped")
    run = run_script(tmp_path, args + ["--out", out], SIGNAL_GROUP_AT_CALL=11, SIGNAL_NAME=name)
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "killed by signal" not in run.stderr, run.stderr[-3000:]
    assert f"{name}: saved {out}/checkpoint.pt at step 11" in run.stdout
    ckpt = engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_images"]) == (1, 11, 3 * 8)
    train.main(args + ["--out", out, "--resume"])
    a, b = weights(tmp_path / "unbroken"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch):
    args = SMALL + ["--epochs", "2", "--save-every", "3"]
    train.main(args + ["--out", str(tmp_path / "unbroken")])
    out = str(tmp_path / "killed")
    killed = run_script(tmp_path, args + ["--out", out], KILL_AT_CALL=14)  # step 14 of 16: last save at 12
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_images"]) == (1, 12, 4 * 8)
    assert not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))
    assert [r["epoch"] for r in read_log(out)] == [1]  # epoch 1 was logged before the kill, epoch 2 was not

    real_forward = train.GMAE.forward
    steps = {"n": 0}

    def forward(self, imgs, *a, **kw):  # one training forward per step (no --accum-iter)
        steps["n"] += self.training
        return real_forward(self, imgs, *a, **kw)

    monkeypatch.setattr(train.GMAE, "forward", forward)
    train.main(args + ["--out", out, "--resume"])
    # Only the 4 steps after the last save are run again: a resume that ignored the checkpoint and retrained from
    # the seed would reach the same weights (training is deterministic) but take 16 steps and log epoch 1 twice.
    assert steps["n"] == 16 - 12
    a, b = weights(tmp_path / "unbroken"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"
    log_a, log_b = read_log(tmp_path / "unbroken"), read_log(out)
    timing = ("img_per_s", "time_s")  # wall-clock figures: the only entries a resume may change
    assert [{k: v for k, v in r.items() if k not in timing} for r in log_a] == \
        [{k: v for k, v in r.items() if k not in timing} for r in log_b]
    assert [r["step"] for r in log_b] == [8, 16]


def test_truncated_checkpoint_on_resume_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    message = cli_error(capsys, train.main, SMALL + ["--out", str(out), "--resume"])
    assert re.match("--resume: .*cannot be read as a checkpoint", message)


def test_broken_image_files_are_skipped_and_counted(tmp_path, capsys):
    rng = torch.Generator().manual_seed(0)
    folder = tmp_path / "imgs" / "train"  # with val/ beside it: no files held out of train (data.folder_split)
    for i in range(20):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(20, 24, 3, generator=rng) * 255).byte().numpy()).save(folder / f"c{i % 2}/{i}.png")
    (tmp_path / "imgs" / "val" / "c0").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "val" / "c0" / "ok.png")
    (folder / "c0" / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 9)
    (folder / "c0" / "empty.png").write_bytes(b"")
    raw = (folder / "c1" / "1.png").read_bytes()
    (folder / "c1" / "truncated.png").write_bytes(raw[: len(raw) // 2])
    os.symlink(str(folder / "gone.png"), str(folder / "c1" / "dangling.png"))
    out = str(tmp_path / "run")
    with pytest.warns(data.BrokenImageWarning) as warned:
        train.main(with_flag(SMALL, "--batch-size", "6") + ["--data", str(tmp_path / "imgs"), "--epochs", "2",
                                                            "--out", out])
    log = read_log(out)
    assert [r["skipped_images"] for r in log] == [4, 4]  # 24 files, 4 batches of 6: every file read each epoch
    assert [r["step"] for r in log] == [4, 8] and all(0 < r["train_loss"] < 1 for r in log)
    assert len([w for w in warned if w.category is data.BrokenImageWarning]) == 4  # one per file, not per epoch
    assert "epoch 2: skipped 4 unreadable image files" in capsys.readouterr().out


def test_folders_of_only_broken_files_are_clear_errors(tmp_path, capsys):
    root = tmp_path / "data"  # the run folder beside it: a run inside its own --data is refused
    for split, n in (("train", 8), ("val", 2)):
        (root / split / "c").mkdir(parents=True)
        for i in range(n):
            (root / split / "c" / f"{i}.png").write_bytes(b"nope")
    with pytest.warns(data.BrokenImageWarning):
        message = cli_error(capsys, train.main, SMALL + ["--data", str(root), "--out", str(tmp_path / "run")])
    assert message.startswith("no readable image among the 2 val")
    Image.new("RGB", (20, 20)).save(root / "val" / "c" / "ok.png")
    with pytest.warns(data.BrokenImageWarning):
        message = cli_error(capsys, train.main, SMALL + ["--data", str(root), "--out", str(tmp_path / "run")])
    assert "all 8 images read were unreadable" in message


def test_bf16_autocast_training_is_finite_and_the_loss_falls(tmp_path):
    out = str(tmp_path / "amp")
    train.main(SMALL + ["--epochs", "3", "--amp", "--out", out])
    log = read_log(out)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    ckpt = engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # autocast keeps float32 weights


def test_rasterizer_runs_in_float32_under_autocast():
    g = splat.random_gaussians(2, 16, torch.Generator().manual_seed(0))
    ref = splat.render(g, 16, 16, backend=BACKEND)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = splat.render(g, 16, 16, backend=BACKEND)
        half_in = splat.render(g.bfloat16(), 16, 16, backend=BACKEND)
    assert inside.dtype == torch.float32 and torch.equal(inside, ref)
    assert half_in.dtype == torch.bfloat16  # cast back out; computed from the bf16-rounded Gaussians in float32
    assert (half_in.float() - splat.render(g.bfloat16().float(), 16, 16, backend=BACKEND)).abs().max() <= 2 ** -8


@pytest.mark.parametrize("flags, message", [
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--accum-iter", "0"], "--accum-iter must be >= 1"),
    (["--batch-size", "40", "--accum-iter", "2"], "fewer than one step needs: --batch-size 40 x --accum-iter 2"),
])
def test_scale_flag_errors(tmp_path, capsys, flags, message):
    if flags[:2] == ["--amp", "fp16"] and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    args = SMALL + ["--out", str(tmp_path)]
    for flag, value in zip(flags[::2], flags[1::2]):
        args = with_flag(args, flag, value) if flag in args else args + [flag, value]
    assert message in cli_error(capsys, train.main, args)


def test_whole_batches_of_broken_files_end_the_epoch_early_and_training_goes_on(tmp_path):
    folder = tmp_path / "imgs" / "train"  # with val/ beside it: no files held out of train (data.folder_split)
    folder.mkdir(parents=True)
    (tmp_path / "imgs" / "val").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "val" / "ok.png")
    for i in range(16):
        if i % 4 == 0:
            Image.new("RGB", (20, 20), (60 * (i // 4), 0, 0)).save(folder / f"{i:02d}.png")
        else:
            (folder / f"{i:02d}.png").write_bytes(b"broken")
    out = str(tmp_path / "run")
    with pytest.warns(data.BrokenImageWarning):
        train.main(with_flag(SMALL, "--batch-size", "4") + ["--data", str(tmp_path / "imgs"), "--epochs", "2",
                                                            "--out", out])
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and [r["skipped_images"] for r in log] == [12, 12]
    # Seed 0's second epoch puts two good files in one batch, so another batch is all broken: 3 steps, not 4.
    assert [r["step"] for r in log] == [4, 7]


def every_third_file_broken(root, n=16):
    """root/train/ holds n 20 x 20 PNGs, files 0, 3, 6, ... unreadable; root/val/ 4 readable ones. At batch 2 and
    seed 0, epoch 1 reads [1, 0, 2, 2, 2, 0, 1, 2] readable files per batch: batch 2 is read past inside step 2,
    and the shard runs out after 6 of 8 steps; epochs 2 and 3 have no all-broken batch."""
    for split, count in (("train", n), ("val", 4)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            if split == "train" and i % 3 == 0:
                (root / split / f"{i:02d}.png").write_bytes(b"broken")
            else:
                Image.new("RGB", (20, 20), (15 * i, 100, 0)).save(root / split / f"{i:02d}.png")
    return str(root)


def tiny_model():
    torch.manual_seed(0)
    return M.GMAE(train.config_from_args(train.get_args(SMALL)))


class Batches(list):
    batch_size = 4  # what ReadableBatches reads off a DataLoader


def test_a_step_cut_short_by_the_shard_adds_nothing_to_the_epoch_sums():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = train.Progress()
    # --accum-iter 2: the first micro-batch loads, then the shard holds one batch of unreadable files and ends.
    batches = engine.ReadableBatches(Batches([(torch.rand(4, 3, 16, 16), None), None]))  # Batches: batch_size 4
    assert train.train_step(model, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False), progress, 4, 2,
                            None, BACKEND, 1.0, torch.device("cpu"), 1, None) is None
    assert progress.sums == [0.0, 0, 4]  # neither the dropped micro-batch's loss nor its 4 images; the 4 broken files
    assert (progress.step, progress.epoch_step, progress.epoch_items) == (0, 0, 8)  # 2 batches of 4 read
    assert all(p.grad is None for p in model.parameters())  # the partial accumulation is gone


@pytest.mark.filterwarnings("ignore::data.BrokenImageWarning")
def test_the_lr_follows_the_run_position_so_it_reaches_min_lr_after_an_epoch_ends_early(tmp_path):
    folder = every_third_file_broken(tmp_path / "imgs")
    lrs = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, a, kw: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        train.main(with_flag(SMALL, "--batch-size", "2") + ["--data", folder, "--epochs", "3", "--min-lr", "1e-4",
                                                            "--out", str(tmp_path / "run")])
    finally:
        hook.remove()
    assert [r["step"] for r in read_log(tmp_path / "run")] == [6, 14, 22]  # epoch 1 ended 2 steps early
    steps_per_epoch, warmup = 8, 4  # 16 files / batch 2; --warmup-epochs 0.5
    positions = list(range(6)) + list(range(8, 24))  # epochs 2 and 3 start where a whole epoch 1 would have ended
    assert lrs == [train.lr_at(p, 3 * steps_per_epoch, warmup, 2e-3, 1e-4) for p in positions]
    assert lrs[-1] == train.lr_at(23, 24, warmup, 2e-3, 1e-4) < 1e-4 + 0.01 * 2e-3  # the cosine's last step


@pytest.mark.filterwarnings("ignore::data.BrokenImageWarning")
def test_resume_mid_epoch_after_a_batch_of_broken_files_is_bit_identical(tmp_path, monkeypatch):
    args = with_flag(SMALL, "--batch-size", "2") + ["--data", every_third_file_broken(tmp_path / "imgs"),
                                                     "--epochs", "2"]
    train.main(args + ["--out", str(tmp_path / "unbroken")])
    real_forward = train.GMAE.forward
    calls = {"n": 0}

    def forward(self, imgs, *a, **kw):
        calls["n"] += self.training
        if calls["n"] == 3 and self.training:  # step 3 of epoch 1, after the all-broken batch 2 was read past
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, imgs, *a, **kw)

    monkeypatch.setattr(train.GMAE, "forward", forward)
    out = str(tmp_path / "stopped")
    with pytest.raises(SystemExit):
        train.main(args + ["--out", out])
    stopped = engine.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    monkeypatch.setattr(train.GMAE, "forward", real_forward)
    train.main(args + ["--out", out, "--resume"])
    a, b = weights(tmp_path / "unbroken"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"
    assert (stopped["step"], stopped.get("epoch_items")) == (3, [8])  # 3 steps had read 4 batches of 2
    timing = ("img_per_s", "time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / "unbroken")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in read_log(out)]


def test_loader_items_are_the_same_with_any_number_of_workers_and_in_ddp_shards():
    scenes = data.SyntheticScenes(32, 16, transform=data.train_transform(16))
    torch.manual_seed(0)
    rng = torch.get_rng_state()

    def epoch_items(workers=0, rank=0, world_size=1, batch_size=8, start=0):
        loader, sampler = data.make_loader(scenes, batch_size, rank, world_size, seed=0, workers=workers)
        sampler.set_epoch(3, start=start)
        return torch.cat([imgs for imgs, _ in loader])  # [items, 3, 16, 16]

    one, two = epoch_items(), epoch_items(workers=2)
    assert torch.equal(two, one)
    assert torch.equal(torch.get_rng_state(), rng)  # augmentation left the caller's RNG (the masks') alone
    assert torch.equal(epoch_items(start=8), one[8:])  # a resumed epoch reads what the unbroken one would
    shards = [epoch_items(rank=r, world_size=2, batch_size=4) for r in range(2)]
    assert torch.equal(torch.stack(shards, 1).flatten(0, 1), one)  # DDP's shards: the same crops, interleaved
    plain = data.SyntheticScenes(32, 16)
    assert not any(torch.equal(x, plain[i][0]) for x in one for i in range(32))  # cropped or flipped, every one
    loader, sampler = data.make_loader(scenes, 8, seed=0)
    sampler.set_epoch(4)
    assert not torch.equal(torch.cat([imgs for imgs, _ in loader]), one)  # another epoch, other crops


def test_readable_batches_read_past_empty_ones_and_count_what_they_drop():
    imgs = torch.zeros(3, 3, 4, 4)
    batches = engine.ReadableBatches(Batches([None, None, (imgs, None), (imgs[:2], None), None]))
    assert next(batches)[0] is imgs and (batches.skipped, batches.read) == (4 + 4 + 1, 3)  # 3 batches read
    assert len(next(batches)[0]) == 2 and (batches.skipped, batches.read) == (9 + 2, 4)
    assert next(batches, None) is None and (batches.skipped, batches.read) == (11 + 4, 5)  # the loader ran out


def test_probe_and_finetune_run_under_torchrun(tmp_path):
    import probe

    train.main(SMALL + ["--epochs", "1", "--max-steps", "2", "--out", str(tmp_path / "pre")])
    ckpt = str(tmp_path / "pre" / "checkpoint.pt")
    probe_args = ["--ckpt", ckpt, "--n-synthetic", "64", "--n-val", "32", "--epochs", "0", "--knn", "5"]
    one = probe.main(probe_args + ["--out", str(tmp_path / "probe1.json")])

    def torchrun(script, args):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, script)] + args, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout

    out = torchrun("probe.py", probe_args + ["--out", str(tmp_path / "probe2.json")])
    assert out.count("wrote ") == 1  # rank 0 only
    two = json.loads((tmp_path / "probe2.json").read_text())
    assert two["num_train"] == one["num_train"] == 64
    # Features are extracted in shards and gathered; only batch composition (float rounding) differs.
    assert two["knn"]["top1"] == pytest.approx(one["knn"]["top1"], abs=100 / 32 + 1e-9)

    out = torchrun("finetune.py", ["--ckpt", ckpt, "--n-synthetic", "64", "--n-val", "32", "--epochs", "1",
                                   "--batch-size", "8", "--out", str(tmp_path / "ft")])
    result = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert len(result["history"]) == 1 and 0 < result["last"]["train_loss"] < 10
    assert "lr 6.25e-05" in out  # blr 1e-3 x global batch 16 / 256
