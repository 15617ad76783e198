"""
Pretrain GMAE (or plain MAE with --decoder pixels) with the MAE recipe.

    python train.py                                   # ~4 min on a 2-core CPU: 32 px synthetic scenes
    python train.py --gaussians 512 --mask 0.75       # 64 query tokens of 8 Gaussians each (--gaussians-per-token)
    python train.py --decoder pixels                  # the MAE baseline, same code path and loss
    python train.py --data /path/to/imagenet --model base --img-size 224 --patch 16 --gaussians 512 \
                    --scale-max 1 --loss-on masked --no-center-depth --no-anchors --gaussians-per-token 1 --blr 1e-4 \
                    --epochs 400 --batch-size 256 --warmup-epochs 20      # the paper's setting (GPUs)

The laptop defaults depart from the paper where 4 minutes at 32 px need it (README "Laptop defaults"):
c = 2 (coverage of 64 Gaussians on 32 px), lr 2e-3 at batch 32 (short schedule), the loss on the whole
image, --center-depth (each image's mean raw depth removed, so depth cannot saturate as a size knob) and
--anchors (each query token starts from its own grid point; GMAEConfig.anchors).

Recipe (MAE, He et al. 2022, Sec. A.1; GMAE Table 5):
    AdamW, betas (0.9, 0.95), weight decay 0.05 except biases, norms and tokens
    lr = blr * batch / 256, linear warmup per iteration, then cosine to --min-lr
    gradient clipping at --clip-grad; a loss that is not finite stops the run and names the step

After every epoch, on --val-size validation images (model.reconstruction_metrics): val loss, PSNR over the
masked pixels (the paper's), PSNR of the whole image at mask 0 (each the mean of per-image PSNRs, in pixel space
under --norm-pix), and the depth statistics of the
Gaussians (per-image std of z, share saturated at |z| > 0.99, correlation of scale and z).

Writes to --out: checkpoint.pt (model, optimizer, config, epoch; written atomically), log.jsonl (one line
per epoch) and recon_epochNNN.png, rows: input / masked input / reconstruction / the reconstruction's masked
patches pasted into the input / reconstruction at mask 0 / the Gaussians coloured by depth (near = bright).
--resume continues from checkpoint.pt exactly where it stopped (README "Long runs").

Scale and faults (issue 10; README "Many GPUs and machines"):
    torchrun --nproc_per_node 8 train.py ...    DistributedDataParallel (nccl on GPU, gloo on CPU); each process
                                                reads its shard (data.make_loader); logs, PNGs, checkpoints on rank 0
    global batch = --batch-size x --accum-iter x processes, and lr = blr x global batch / 256
    --amp [bf16|fp16]   mixed precision (autocast); the rasterizer always runs in float32 (splat.render)
    --resume            model, optimizer, lr position, GradScaler, epoch, step in the epoch, the items each
                        process's shard had read and every process's RNG states: a killed and resumed run reaches
                        the parameters of an unbroken one, with any --workers (an item's crop depends on
                        (seed, epoch, index) only: data.SeededItems)
    SIGTERM, Ctrl-C     finish the step, write checkpoint.pt, exit with 143 / 130 (to the process or its whole
                        group, with any --workers); --save-every N also covers SIGKILL
    unreadable files    skipped and counted; when a shard runs out early (whole batches unreadable), every process
                        ends the epoch at the same step (engine.any_process), the step left partial is dropped and
                        the lr follows the run's position (epoch x steps per epoch + step), so it still ends at
                        --min-lr
"""
import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import splat
from data import VAL_FRACTION, build_dataset, make_loader, split_note, to_uint8
from engine import (
    USER_ERRORS,
    CheckpointError,
    ReadableBatches,
    add_run_flags,
    all_reduce_sum,
    any_process,
    check_flags,
    claim_run_folder,
    distributed,
    gather_objects,
    lr_at,
    param_groups,
    read_checkpoint,
    rng_states,
    run_main,
    save_checkpoint,
    save_image,
    set_lr,
    set_rng_states,
    unwrap,
    wrap_ddp,
    write_whole,
)
from model import GMAE, MODEL_SIZES, GMAEConfig, patchify, reconstruction_metrics, unpatchify

RUN_MARKS = ("checkpoint.pt", "log.jsonl")  # an --out holding one of these holds a run: it is not replaced unasked
RUN_OWNED = ("recon_epoch*.png", "checkpoint.pt.tmp")  # the run's other files, which --overwrite deletes too


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; the message names the step."""


def build_parser():
    d = GMAEConfig.preset("tiny")  # the laptop defaults live in model.py (LAPTOP_DEFAULTS); the paper's in each help
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic' (embedded, default) or an image folder: "
                   "root/{train,val}/..., or any folder of images or class folders (then --val-fraction is held out)")
    p.add_argument("--n-synthetic", type=int, default=2048, help="number of synthetic training scenes")
    p.add_argument("--model", default="tiny", choices=MODEL_SIZES, help="encoder/decoder size (paper: base)")
    p.add_argument("--img-size", type=int, default=d.img_size, help="paper: 224")
    p.add_argument("--patch", type=int, default=d.patch_size, help="patch size (paper: 16)")
    p.add_argument("--gaussians", type=int, default=d.num_gaussians, help="number of Gaussians k (paper: 512)")
    p.add_argument("--gaussians-per-token", type=int, default=None,
                   help="g Gaussians from each decoder query token (default: the smallest g leaving at most one "
                        "query token per patch, e.g. 8 for 512 Gaussians at 32 px; paper: 1, a token per Gaussian)")
    p.add_argument("--mask", type=float, default=d.mask_ratio, help="mask ratio (paper: 0.75)")
    p.add_argument("--scale-max", type=float, default=d.scale_max,
                   help="c in scale = c*sigmoid(s); largest std c*W/16 px (paper: 1, ablates 0.5/2)")
    p.add_argument("--decoder", default=d.decoder, choices=["gaussians", "pixels"], help="GMAE or plain MAE")
    p.add_argument("--loss-on", default=d.loss_on, choices=["masked", "all"],
                   help="pixels scored by the loss (paper: masked; whole image is its ablation)")
    p.add_argument("--norm-pix", action="store_true", default=d.norm_pix,
                   help="per-patch normalised targets (hurts GMAE)")
    p.add_argument("--center-depth", action=argparse.BooleanOptionalAction, default=d.center_depth,
                   help="subtract each image's mean raw depth before tanh (departure from the paper; README)")
    p.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=d.anchors,
                   help="anchored queries: each Gaussian starts at its own grid point (a departure; paper: off)")
    p.add_argument("--splat", default="auto", choices=splat.BACKENDS, help="rasterizer backend")
    p.add_argument("--epochs", type=int, default=20, help="paper: 400")
    p.add_argument("--batch-size", type=int, default=32, help="per step (paper: 4096 in total)")
    p.add_argument("--blr", type=float, default=1.6e-2, help="base lr; lr = blr * batch / 256 (paper: 1e-4)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-epochs", type=float, default=1, help="paper: 20 (of 400)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    add_run_flags(p)  # --val-fraction, --device
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gmae", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for tests)")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="batches per optimizer step (gradient accumulation); global batch = batch x accum x processes")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="mixed precision: --amp = bf16 autocast (CPU, GPU); --amp fp16 with a GradScaler (GPU)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write checkpoint.pt every N steps inside an epoch (0: at the end of each epoch only)")
    p.add_argument("--val-size", type=int, default=256, help="validation images scored after every epoch")
    return p


def get_args(argv=None, parser=None):
    """Flags -> args, every value checked here: a bad one is a one-line parser.error (exit 2)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.val_size < 1:
        p.error(f"--epochs, --batch-size and --val-size must be >= 1, got {args.epochs}, {args.batch_size} and "
                f"{args.val_size}")
    if not args.data.strip():
        p.error("--data is empty; give 'synthetic' or a folder of images")
    if args.accum_iter < 1 or args.save_every < 0:
        p.error(f"--accum-iter must be >= 1 and --save-every >= 0, got {args.accum_iter} and {args.save_every}")
    check_flags(p, args, ranges={"blr": "(0, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_epochs": "[0, inf)",
                                 "weight_decay": "[0, inf)", "clip_grad": "[0, inf)", "workers": "[0, inf)",
                                 "n_synthetic": "[1, inf)", "max_steps": "[1, inf)", "scale_max": "(0, inf)"})
    if args.amp == "fp16" and torch.device(args.device).type != "cuda":
        p.error(f"--amp fp16 needs a CUDA device (it relies on a GradScaler), got {args.device}; use --amp bf16")
    try:
        config_from_args(args)  # GMAEConfig checks --gaussians, --mask, --img-size / --patch, ...
    except ValueError as e:
        p.error(str(e))
    return args


def config_from_args(args):
    """The model's flags -> GMAEConfig (raises ValueError on a bad value)."""
    per_token = {} if args.gaussians_per_token is None else {"gaussians_per_token": args.gaussians_per_token}
    return GMAEConfig.preset(
        args.model, img_size=args.img_size, patch_size=args.patch, mask_ratio=args.mask,
        num_gaussians=args.gaussians, scale_max=args.scale_max, decoder=args.decoder, loss_on=args.loss_on,
        norm_pix=args.norm_pix, center_depth=args.center_depth, anchors=args.anchors, **per_token)


# ---------------------------------------------------------------------------------------------------------
# Pictures of an epoch, reading batches, SIGTERM


def paste_patches(imgs, fill, mask, p):
    """imgs with their masked patches (mask [B, N], 1 = masked) replaced by those of fill (same shape)."""
    x = torch.where(mask.bool().unsqueeze(-1), patchify(fill, p), patchify(imgs, p))
    return unpatchify(x, p, imgs.shape[2], imgs.shape[3])


def save_grid(path, rows, scale=4):
    """rows: list of [B, 3, H, W] tensors in [0, 1] -> one PNG, one row per tensor, upscaled for viewing."""
    grid = torch.cat([torch.cat(list(r.detach().clamp(0, 1)), dim=2) for r in rows], dim=1)  # [3, rows*H, B*W]
    img = Image.fromarray(to_uint8(grid))
    save_image(img.resize((img.width * scale, img.height * scale), Image.NEAREST), path)


def depth_render(gaussians, H, W, backend):
    """Each Gaussian painted with its depth as grey (near z = -1 white, far z = +1 dark) on black."""
    g = gaussians.clone()
    g[..., 10:13] = ((1 - g[..., 2:3]) / 2).expand(-1, -1, 3)
    return splat.render(g, H, W, background=0.0, backend=backend)


@torch.no_grad()
def save_epoch_grid(path, model, imgs, backend, patch_size, seed=0):
    """Rows: input / masked input / reconstruction / masked patches pasted into the input / reconstruction
    at mask 0 / (GMAE) the mask-0 Gaussians coloured by depth, near = bright: layering appearing in training."""
    model.eval()
    out = model(imgs, backend=backend, generator=torch.Generator(imgs.device).manual_seed(seed))
    full = model(imgs, mask_ratio=0.0, backend=backend)
    model.train()
    mask, recon = out["mask"], out["recon"]  # in pixel space (--norm-pix: model.to_pixels)
    rows = [imgs, paste_patches(imgs, torch.full_like(imgs, 0.5), mask, patch_size), recon,
            paste_patches(imgs, recon, mask, patch_size), full["recon"]]
    if full["gaussians"] is not None:
        rows.append(depth_render(full["gaussians"], imgs.shape[2], imgs.shape[3], backend))
    save_grid(path, rows)


class Preemption:
    """SIGTERM (what cluster schedulers send before they stop a job) and SIGINT (Ctrl-C) become a request: the
    training loop finishes its step, writes a checkpoint and exits with 128 + the signal (143, 130). A second one
    stops at once, keeping the last checkpoint. Data loader workers leave the process group (data.make_loader), so
    a signal sent to the whole group, as a scheduler or a terminal does, reaches the loop alone. A context manager; the
    previous handlers come back on exit. Outside the main thread signals cannot be caught: a no-op there."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: stopped at once; the last checkpoint is kept", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------
# Resume, checkpoints and preemption: where a run stands and how it is saved and restored


@dataclass
class Progress:
    """Where a run stands; with the weights, all a checkpoint needs to continue exactly: `step` optimizer steps so
    far, `epoch_step` of them in `epoch` (an epoch that ended early counts as whole), `epoch_items` this
    process's shard has read in the epoch (whole batches of broken files included, so more than epoch_step x
    accum_iter x batch when some were read past), and the epoch's sums over its whole steps [loss x images,
    images, skipped files], so that a resumed epoch logs what an unbroken one would."""
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    epoch_items: int = 0
    sums: list = field(default_factory=lambda: [0.0, 0, 0])


def resume_run(path, cfg, model, optimizer, scaler, steps_per_epoch, global_batch, rank, world_size, device):
    """Load checkpoint.pt into model, optimizer and GradScaler. Returns (Progress, a line for the log)."""
    try:
        ckpt = read_checkpoint(path, device)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None
    if ckpt.get("kind") == "finetune" or "optimizer" not in ckpt:
        what = "a finetune.py classifier" if ckpt.get("kind") == "finetune" else "a checkpoint without optimizer state"
        raise CheckpointError(f"--resume: {path} is {what}, not a train.py run to continue; start a new run with "
                              "another --out, or --overwrite")
    if ckpt["config"] != cfg:
        raise ValueError(f"--resume: the checkpoint's config {ckpt['config']} differs from the flags' {cfg}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():  # empty when saved without --amp fp16
        scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(epoch=ckpt["epoch"], step=ckpt["step"])
    # Mid-epoch: skip the images the checkpoint's run had read (the order depends on (seed, epoch) only).
    # Checkpoints without a position (older ones) were written at the end of their epoch.
    done = ckpt.get("epoch_images")
    progress.epoch_step = steps_per_epoch if done is None else min(done // global_batch, steps_per_epoch)
    if progress.epoch_step == steps_per_epoch:
        progress.epoch, progress.epoch_step = progress.epoch + 1, 0
    elif rank == 0:
        progress.sums = ckpt.get("epoch_sums", progress.sums)  # the whole run's sums so far: rank 0 carries them on
    exact = ckpt.get("global_batch") == global_batch and len(ckpt.get("rng", [])) == world_size
    if exact:
        set_rng_states(ckpt["rng"][rank])  # masks continue as if never stopped (crops follow (seed, epoch, index))
    if progress.epoch_step:
        progress.epoch_items = resume_offset(ckpt, progress.epoch_step, global_batch, rank, world_size, exact)
    if rank == 0:
        append_log(os.path.dirname(path), None, completed=progress.epoch)  # no line past the checkpoint's epochs
    return progress, (f"resumed from {path} at epoch {progress.epoch + 1}, step {progress.step} ({progress.epoch_step} "
                      "into the epoch)" + ("" if exact else "; another global batch or process count, so RNG streams restart"))


def resume_offset(ckpt, epoch_step, global_batch, rank, world_size, exact):
    """Where this process's shard continues a stopped epoch: the items it had read (checkpoint's epoch_items),
    which counts the whole batches of broken files read past. Checkpoints without it, or from another global
    batch or process count, fall back to the items of epoch_step whole steps."""
    items = ckpt.get("epoch_items")
    return items[rank] if exact and items else epoch_step * global_batch // world_size


def save_run(path, model, optimizer, scaler, cfg, progress, global_batch, device, main_process, data):
    """All processes call this (RNG states and shard positions are gathered); rank 0 writes checkpoint.pt
    atomically. `data` (--data) is kept so that later stages know what the model saw (zeroshot.py warns when a
    model of the synthetic scenes reads photos)."""
    rngs, items = zip(*gather_objects((rng_states(), progress.epoch_items)))
    epoch_sums = all_reduce_sum(progress.sums, device)
    if main_process:
        save_checkpoint(path, model, optimizer, cfg, progress.epoch, progress.step, extra={
            "epoch_images": progress.epoch_step * global_batch, "epoch_items": list(items), "epoch_sums": epoch_sums,
            "global_batch": global_batch, "scaler": scaler.state_dict(), "rng": list(rngs), "data": data})


# ---------------------------------------------------------------------------------------------------------
# One training step, the end of an epoch, the recipe


def train_step(ddp_model, batches, optimizer, scaler, progress, batch_size, accum_iter, amp_dtype, backend, clip_grad,
               device, world_size, preemption):
    """One optimizer step: accum_iter micro-batches (forward under autocast, scaled backward), gradient clipping,
    AdamW. Adds to progress; the step's loss and images only once the step is whole. Returns (loss, whether some
    process got SIGTERM), or None when some process's shard ran out before the step was whole (whole batches of
    unreadable files are read past): then every process drops the step, partial accumulation included."""
    model = unwrap(ddp_model)
    loss_sum, seen = 0.0, 0
    for micro in range(accum_iter):
        skipped, read = batches.skipped, batches.read
        batch = next(batches, None)  # batches: engine.ReadableBatches, past whole batches of unreadable files
        progress.sums[2] += batches.skipped - skipped
        progress.epoch_items += (batches.read - read) * batch_size
        if any_process(batch is None, device):  # before the forward: all take the micro-step or none
            optimizer.zero_grad(set_to_none=True)  # drop a partial accumulation
            return None
        imgs = batch[0].to(device, non_blocking=True)
        # DDP averages the gradients over processes in backward; only on the last micro-batch of a step.
        last = micro == accum_iter - 1
        with contextlib.nullcontext() if last or ddp_model is model else ddp_model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = ddp_model(imgs, backend=backend)["loss"]
            # One all-reduce: the mean loss, and whether any process got SIGTERM or SIGINT (all stop together).
            sigterm = float(preemption is not None and preemption.requested)
            loss_value, stop = all_reduce_sum([loss.item() / world_size, sigterm], device)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at step {progress.step} (epoch {progress.epoch + 1}); "
                                       "stopping. The last good checkpoint is kept. Try a lower --blr or --clip-grad.")
            scaler.scale(loss / accum_iter).backward()
        loss_sum += loss_value * imgs.shape[0]
        seen += imgs.shape[0]
    scaler.unscale_(optimizer)  # no-op unless --amp fp16
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else math.inf)
    if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16: the scaler skips such steps itself
        raise TrainingDiverged(f"gradient norm is {norm.item()} at step {progress.step} (epoch {progress.epoch + 1}); "
                               "stopping. The last good checkpoint is kept. Try a lower --blr.")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.epoch_step += 1
    progress.sums[0] += loss_sum
    progress.sums[1] += seen
    return loss_value, stop


def end_of_epoch(model, val_imgs, progress, fresh_images, epoch_time, run_time, out, backend, device, main_process):
    """Sum the epoch over processes; on rank 0 score the validation images (model.reconstruction_metrics), print
    and write recon_epochNNN.png. Returns the epoch's record for log.jsonl ({} on other ranks), None when the
    epoch read no image."""
    loss_sum, seen, skipped, fresh = all_reduce_sum(progress.sums + [fresh_images], device)
    epoch = progress.epoch + 1
    if seen == 0:
        if skipped:
            raise ValueError(f"epoch {epoch}: all {int(skipped)} images read were unreadable; check --data")
        return None
    if skipped and main_process:
        print(f"epoch {epoch}: skipped {int(skipped)} unreadable image files (warnings above name them)")
    if not main_process:
        return {}
    val = reconstruction_metrics(model, val_imgs, backend)
    record = {"epoch": epoch, "step": progress.step, "train_loss": loss_sum / seen,
              **{f"val_{k}" if k == "loss" else k: v for k, v in val.items()},
              "img_per_s": fresh / epoch_time, "time_s": run_time}  # images this session read, all processes
    if skipped:
        record["skipped_images"] = int(skipped)
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    save_epoch_grid(os.path.join(out, f"recon_epoch{epoch:03d}.png"), model, val_imgs[:8], backend,
                    model.cfg.patch_size)
    return record


def append_log(out, record, completed=None):
    """Add the epoch's record to log.jsonl, after its checkpoint is written, so the log never holds an epoch the
    checkpoint does not; completed (on resume): first drop any line past that many epochs (a run stopped between
    the two writes by older code, or a half-written last line)."""
    path = os.path.join(out, "log.jsonl")
    if completed is not None and os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
        keep = [line for line in lines if line.endswith("}") and json.loads(line)["epoch"] <= completed]
        if keep != lines:
            write_whole(path, "".join(line + "\n" for line in keep).encode())
    if record:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def stop_on_signal(save, progress, steps_per_epoch, ckpt_path, log, signum):
    """The step is finished: write checkpoint.pt and exit with 128 + signum (143 for SIGTERM, as schedulers
    expect; 130 for Ctrl-C). Processes that learnt of the stop from another one exit as for SIGTERM."""
    save()
    log(f"{signal.Signals(signum).name}: saved {ckpt_path} at step {progress.step} ({progress.epoch_step} of "
        f"{steps_per_epoch} in epoch {progress.epoch + 1}); continue with --resume")
    raise SystemExit(128 + signum)


def validation_images(data, img_size, val_size, seed, device, val_fraction=VAL_FRACTION):
    """The first val_size readable validation images [V, 3, S, S] on device (broken files skipped): never a
    training image (data.build_dataset holds them out of a folder without train/ and val/)."""
    val_set = build_dataset(data, img_size, train=False, n_synthetic=val_size, seed=seed, val_fraction=val_fraction)
    readable = (item for item in map(val_set.__getitem__, range(len(val_set))) if item is not None)
    val_imgs = [img for img, _ in itertools.islice(readable, val_size)]
    if not val_imgs:
        raise ValueError(f"no readable image among the {len(val_set)} validation files of --data {data}")
    return torch.stack(val_imgs).to(device)


def pretrain(cfg, *, data, n_synthetic, epochs, batch_size, blr, lr, min_lr, warmup_epochs, weight_decay, clip_grad,
             accum_iter, amp, backend, workers, device, seed, out, resume, max_steps, save_every, val_size,
             val_fraction=VAL_FRACTION, rank=0, world_size=1, preemption=None, overwrite=False):
    """The training run of `python train.py` (one process) or of one of torchrun's processes (rank of
    world_size). Returns the trained model (unwrapped from DDP)."""
    device, main_process = torch.device(device), rank == 0  # rank 0 logs, writes PNGs and checkpoints
    log = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(seed)  # the same on every process: identical initial weights
    random.seed(seed)
    np.random.seed(seed)
    if main_process:  # refused if --out holds a run and neither --resume nor --overwrite is given; locked
        claim_run_folder(out, resume, overwrite, RUN_MARKS, RUN_OWNED, inputs=[data] if data != "synthetic" else [])
    ckpt_path = os.path.join(out, "checkpoint.pt")
    train_set = build_dataset(data, cfg.img_size, train=True, n_synthetic=n_synthetic, seed=seed,
                              val_fraction=val_fraction)
    # Each process reads its own shard of one permutation per epoch: together, batch x world_size images.
    loader, sampler = make_loader(train_set, batch_size, rank, world_size, seed=seed, workers=workers,
                                  pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader) // accum_iter  # optimizer steps; a last incomplete accumulation is dropped
    global_batch = batch_size * accum_iter * world_size  # images per optimizer step
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(train_set)} images, fewer than one step needs: --batch-size "
                         f"{batch_size} x --accum-iter {accum_iter} x {world_size} processes = {global_batch}")
    val_imgs = validation_images(data, cfg.img_size, val_size, seed, device, val_fraction) if main_process else None

    model = GMAE(cfg).to(device)
    ddp_model = wrap_ddp(model, device)  # = model when single-process; DDP copies rank 0's weights to all
    if world_size > 1:
        torch.manual_seed(seed + rank)  # different masks on every process (MAE: seed + rank); crops: data.SeededItems
    lr = lr if lr is not None else blr * global_batch / 256  # MAE: scaled by the global batch
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # fp16 gradients underflow without it
    progress = Progress()
    if resume:
        progress, message = resume_run(ckpt_path, cfg, model, optimizer, scaler, steps_per_epoch, global_batch, rank,
                                       world_size, device)
        log(message)
    save = functools.partial(save_run, ckpt_path, model, optimizer, scaler, cfg, progress, global_batch, device,
                             main_process, data)
    total_steps, warmup_steps = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    log(f"{cfg.decoder} decoder, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_set)} "
        f"images, {steps_per_epoch} steps/epoch, global batch {global_batch} = {batch_size} x {accum_iter} accum x "
        f"{world_size} processes, lr {lr:.2e}, device {device}, splat {backend}, amp {amp or 'off'}\n"
        + split_note(data, val_fraction))
    t_start = time.time()
    for epoch in range(progress.epoch, epochs):
        progress.epoch = epoch
        sampler.set_epoch(progress.epoch, start=progress.epoch_items)
        batches, t0, seen_before = ReadableBatches(loader), time.time(), progress.sums[1]
        ddp_model.train()
        bar = tqdm(total=steps_per_epoch, initial=progress.epoch_step, desc=f"epoch {progress.epoch + 1}/{epochs}",
                   leave=False, disable=not main_process)
        while progress.epoch_step < steps_per_epoch and (max_steps is None or progress.step < max_steps):
            # The run's position, not the steps taken: an epoch ended early counts whole (the cosine ends at min-lr)
            position = progress.epoch * steps_per_epoch + progress.epoch_step
            set_lr(optimizer, lr_at(position, total_steps, warmup_steps, lr, min_lr))
            result = train_step(ddp_model, batches, optimizer, scaler, progress, batch_size, accum_iter, amp_dtype,
                                backend, clip_grad, device, world_size, preemption)
            if result is None:  # a shard ran out (whole batches of broken files): the epoch ends early, everywhere
                progress.epoch_step = steps_per_epoch
                break
            bar.update(1)
            bar.set_postfix(loss=f"{result[0]:.4f}", img_s=f"{(progress.sums[1] - seen_before) / (time.time() - t0):.0f}")
            if result[1]:
                stop_on_signal(save, progress, steps_per_epoch, ckpt_path, log, preemption.signum or signal.SIGTERM)
            if save_every and progress.step % save_every == 0 and progress.epoch_step < steps_per_epoch:
                save()
        bar.close()
        record = end_of_epoch(model, val_imgs, progress, progress.sums[1] - seen_before, time.time() - t0,
                              time.time() - t_start, out, backend, device, main_process)
        if record is None:
            break
        save()
        append_log(out, record)
        if progress.epoch_step < steps_per_epoch:  # --max-steps
            break
        progress.epoch_step, progress.epoch_items, progress.sums[:] = 0, 0, [0.0, 0, 0]
    log(f"done: {ckpt_path}")
    return model


def main(argv=None):
    """Parse flags, join torchrun's process group if launched by torchrun (engine.distributed), train. A run that
    cannot start or has to stop (missing checkpoint, unreadable data, a diverged loss) ends as one parser.error line."""
    parser = build_parser()
    args = get_args(argv, parser)
    try:
        with distributed(args.device) as (rank, world_size, device), Preemption() as preemption:
            return pretrain(config_from_args(args), data=args.data, n_synthetic=args.n_synthetic, epochs=args.epochs,
                            batch_size=args.batch_size, blr=args.blr, lr=args.lr, min_lr=args.min_lr,
                            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
                            clip_grad=args.clip_grad, accum_iter=args.accum_iter, amp=args.amp, backend=args.splat,
                            workers=args.workers, device=device, seed=args.seed, out=args.out, resume=args.resume,
                            max_steps=args.max_steps, save_every=args.save_every, val_size=args.val_size,
                            val_fraction=args.val_fraction, rank=rank, world_size=world_size, preemption=preemption,
                            overwrite=args.overwrite)
    except (*USER_ERRORS, TrainingDiverged) as e:
        parser.error(str(e))


if __name__ == "__main__":
    run_main(main)
