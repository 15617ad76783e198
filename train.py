"""
Pretrain GMAE (or plain MAE with --decoder pixels) with the MAE recipe.

    python train.py                                   # ~4 min on a 2-core CPU: 32 px synthetic scenes
    python train.py --gaussians 512 --mask 0.75
    python train.py --decoder pixels                  # the MAE baseline, same code path and loss
    python train.py --data /path/to/imagenet --model base --img-size 224 --patch 16 --gaussians 512 \
                    --scale-max 1 --loss-on masked --no-center-depth --no-anchors --blr 1e-4 \
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
masked pixels (the loss region), PSNR of the whole image at mask 0, and the depth statistics of the
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
    --resume            model, optimizer, lr position, GradScaler, epoch, step in the epoch and every process's
                        RNG states: a killed and resumed run reaches the parameters of an unbroken one
    SIGTERM             finish the step, write checkpoint.pt, exit with 143; --save-every N also covers SIGKILL
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import engine
import splat
from data import build_dataset, make_loader
from model import GMAE, GMAEConfig, patchify, reconstruction_metrics, unpatchify
from engine import CheckpointError, all_reduce_sum, distributed, gather_objects, lr_at, param_groups, read_checkpoint, rng_states, save_checkpoint, set_rng_states, wrap_ddp

# Model sizes: (enc_dim, enc_depth, enc_heads, dec_dim, dec_depth, dec_heads). "base" is the paper's ViT-B
# with MAE's 512-wide, 8-deep decoder; "tiny" is the laptop default.
MODEL_SIZES = {
    "tiny": (192, 6, 3, 128, 2, 4),
    "small": (384, 12, 6, 256, 4, 8),
    "base": (768, 12, 12, 512, 8, 16),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic' (embedded, default) or an image folder path")
    p.add_argument("--n-synthetic", type=int, default=2048, help="number of synthetic training scenes")
    p.add_argument("--model", default="tiny", choices=MODEL_SIZES, help="encoder/decoder size (paper: base)")
    p.add_argument("--img-size", type=int, default=32, help="paper: 224")
    p.add_argument("--patch", type=int, default=4, help="patch size (paper: 16)")
    # Laptop defaults (README "Laptop defaults", measured there): a 2-core CPU run of about 4 minutes that
    # learns well past the mean-colour guess, with depth alive. The paper's values are in each help string.
    p.add_argument("--gaussians", type=int, default=64, help="number of Gaussians k (paper: 512)")
    p.add_argument("--mask", type=float, default=0.75, help="mask ratio (paper: 0.75)")
    p.add_argument("--scale-max", type=float, default=2.0,
                   help="c in scale = c*sigmoid(s); largest std c*W/16 px (paper: 1, ablates 0.5/2)")
    p.add_argument("--decoder", default="gaussians", choices=["gaussians", "pixels"], help="GMAE or plain MAE")
    p.add_argument("--loss-on", default="all", choices=["masked", "all"],
                   help="pixels scored by the loss (paper: masked; whole image is its ablation)")
    p.add_argument("--norm-pix", action="store_true", help="per-patch normalised targets (hurts GMAE)")
    p.add_argument("--center-depth", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract each image's mean raw depth before tanh (departure from the paper; README)")
    p.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gmae", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for tests)")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="batches per optimizer step (gradient accumulation); global batch = batch x accum x processes")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="mixed precision: --amp = bf16 autocast (CPU, GPU); --amp fp16 with a GradScaler (GPU)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write checkpoint.pt every N steps inside an epoch (0: at the end of each epoch only)")
    p.add_argument("--val-size", type=int, default=256, help="validation images scored after every epoch")
    return p.parse_args(argv)


def config_from_args(args):
    enc_dim, enc_depth, enc_heads, dec_dim, dec_depth, dec_heads = MODEL_SIZES[args.model]
    return GMAEConfig(
        img_size=args.img_size, patch_size=args.patch, enc_dim=enc_dim, enc_depth=enc_depth, enc_heads=enc_heads,
        dec_dim=dec_dim, dec_depth=dec_depth, dec_heads=dec_heads, mask_ratio=args.mask,
        num_gaussians=args.gaussians, scale_max=args.scale_max, decoder=args.decoder, loss_on=args.loss_on,
        norm_pix=args.norm_pix, center_depth=args.center_depth, anchors=args.anchors,
    )


def paste_patches(imgs, fill, mask, p):
    """imgs with their masked patches (mask [B, N], 1 = masked) replaced by those of fill (same shape)."""
    x = torch.where(mask.bool().unsqueeze(-1), patchify(fill, p), patchify(imgs, p))
    return unpatchify(x, p, imgs.shape[2], imgs.shape[3])


def save_grid(path, rows, scale=4):
    """rows: list of [B, 3, H, W] tensors in [0, 1] -> one PNG, one row per tensor, upscaled for viewing."""
    grid = torch.cat([torch.cat(list(r.detach().clamp(0, 1)), dim=2) for r in rows], dim=1)  # [3, rows*H, B*W]
    arr = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


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
    mask, pred = out["mask"], out["pred"]
    rows = [imgs, paste_patches(imgs, torch.full_like(imgs, 0.5), mask, patch_size), pred,
            paste_patches(imgs, pred, mask, patch_size), full["pred"]]
    if full["gaussians"] is not None:
        rows.append(depth_render(full["gaussians"], imgs.shape[2], imgs.shape[3], backend))
    save_grid(path, rows)


def next_images(batches, batch_size, device):
    """(images of the next batch on device, number of files skipped as unreadable); images None when the
    iterator is exhausted. collate_skip_broken drops broken files, so a batch can be short or missing."""
    skipped = 0
    for batch in batches:
        if batch is None:  # every file of the batch was unreadable
            skipped += batch_size
            continue
        imgs = batch[0]
        return imgs.to(device, non_blocking=True), skipped + batch_size - imgs.shape[0]
    return None, skipped


class Preemption:
    """SIGTERM (what cluster schedulers send before they stop a job) becomes a request: the training loop
    finishes its step, writes a checkpoint and exits with 143 (128 + SIGTERM). A context manager; the
    previous handler comes back on exit. Outside the main thread signals cannot be caught: a no-op there."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def main(argv=None):
    """Parse flags, join torchrun's process group if launched by torchrun (engine.distributed), train."""
    args = get_args(argv)
    with distributed(args.device) as (rank, world_size, device), Preemption() as preemption:
        return pretrain(args, rank, world_size, device, preemption)


def pretrain(args, rank=0, world_size=1, device="cpu", preemption=None):
    """The training run of `python train.py` (one process) or of one of torchrun's processes (rank of
    world_size). Returns the trained model (unwrapped from DDP)."""
    cfg = config_from_args(args)  # validates --gaussians, --mask, --img-size / --patch
    if args.epochs < 1 or args.batch_size < 1 or args.val_size < 1:
        raise SystemExit(f"--epochs, --batch-size and --val-size must be >= 1, got {args.epochs}, "
                         f"{args.batch_size} and {args.val_size}")
    if args.accum_iter < 1 or args.save_every < 0:
        raise SystemExit(f"--accum-iter must be >= 1 and --save-every >= 0, got {args.accum_iter} and {args.save_every}")
    device = torch.device(device)
    if args.amp == "fp16" and device.type != "cuda":
        raise SystemExit(f"--amp fp16 needs a CUDA device (it relies on a GradScaler), got {device}; use --amp bf16")
    main_process = rank == 0  # logs, PNGs and checkpoints
    log = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same on every process: identical initial weights
    random.seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    train_set = build_dataset(args.data, args.img_size, train=True, n_synthetic=args.n_synthetic, seed=args.seed)
    # Each process reads its own shard of one permutation per epoch: together, batch x world_size images.
    loader, sampler = make_loader(train_set, args.batch_size, rank, world_size, seed=args.seed,
                                  workers=args.workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader) // args.accum_iter  # optimizer steps; a last incomplete accumulation is dropped
    global_batch = args.batch_size * args.accum_iter * world_size  # images per optimizer step
    if steps_per_epoch == 0:
        raise SystemExit(f"the dataset has {len(train_set)} images, fewer than one step needs: --batch-size "
                         f"{args.batch_size} x --accum-iter {args.accum_iter} x {world_size} processes = {global_batch}")
    if main_process:
        val_set = build_dataset(args.data, args.img_size, train=False, n_synthetic=args.val_size, seed=args.seed)
        readable = (item for item in map(val_set.__getitem__, range(len(val_set))) if item is not None)
        val_imgs = [img for img, _ in itertools.islice(readable, args.val_size)]  # broken files skipped
        if not val_imgs:
            raise SystemExit(f"no readable image among the {len(val_set)} validation files of --data {args.data}")
        val_imgs = torch.stack(val_imgs).to(device)

    model = GMAE(cfg).to(device)
    ddp_model = wrap_ddp(model, device)  # = model when single-process; DDP copies rank 0's weights to all
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # different masks and crops on every process (MAE: seed + rank)
    lr = args.lr if args.lr is not None else args.blr * global_batch / 256  # MAE: scaled by the global batch
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # fp16 gradients underflow without it

    # Position: `step` optimizer steps so far, `epoch_step` of them in the current epoch; `sums` are the
    # epoch's [loss x images, images, skipped files] so far, so a resumed epoch logs what an unbroken one would.
    start_epoch, epoch_step, step, sums = 0, 0, 0, [0.0, 0, 0]
    if args.resume:
        try:
            ckpt = read_checkpoint(ckpt_path, device)
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from None
        if ckpt["config"] != cfg:
            raise SystemExit(f"--resume: the checkpoint's config {ckpt['config']} differs from the flags' {cfg}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():  # empty when saved without --amp fp16
            scaler.load_state_dict(ckpt["scaler"])
        step, start_epoch = ckpt["step"], ckpt["epoch"]
        # Mid-epoch: skip the images the checkpoint's run had read (the order depends on (seed, epoch) only).
        # Checkpoints without a position (older ones) were written at the end of their epoch.
        done = ckpt.get("epoch_images")
        epoch_step = steps_per_epoch if done is None else min(done // global_batch, steps_per_epoch)
        if epoch_step == steps_per_epoch:
            start_epoch, epoch_step = start_epoch + 1, 0
        elif main_process:
            sums = ckpt.get("epoch_sums", sums)  # the whole run's sums so far: rank 0 carries them on
        exact = ckpt.get("global_batch") == global_batch and len(ckpt.get("rng", [])) == world_size
        if exact:
            set_rng_states(ckpt["rng"][rank])  # masks and crops continue as if never stopped
        log(f"resumed from {ckpt_path} at epoch {start_epoch + 1}, step {step} ({epoch_step} into the epoch)"
            + ("" if exact else "; another global batch or process count, so RNG streams restart"))

    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.decoder} decoder, {n_params / 1e6:.2f}M parameters, {len(train_set)} images, "
        f"{steps_per_epoch} steps/epoch, global batch {global_batch} = {args.batch_size} x {args.accum_iter} accum x "
        f"{world_size} processes, lr {lr:.2e}, device {device}, splat {args.splat}, amp {args.amp or 'off'}")

    def checkpoint(epoch):
        """All processes call this (the RNG states are gathered); rank 0 writes."""
        rngs, epoch_sums = gather_objects(rng_states()), all_reduce_sum(sums, device)
        if main_process:
            save_checkpoint(ckpt_path, model, optimizer, cfg, epoch, step, extra={
                "epoch_images": epoch_step * global_batch, "epoch_sums": epoch_sums, "global_batch": global_batch,
                "scaler": scaler.state_dict(), "rng": rngs})

    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start=epoch_step * args.accum_iter * args.batch_size)
        batches = iter(loader)
        ddp_model.train()
        bar = tqdm(total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=not main_process)
        t0, seen_before = time.time(), sums[1]
        while epoch_step < steps_per_epoch and (args.max_steps is None or step < args.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, lr, args.min_lr)
            got = 0
            for micro in range(args.accum_iter):
                imgs, skipped = next_images(batches, args.batch_size, device)
                sums[2] += skipped
                if imgs is None:
                    break
                # DDP averages the gradients over processes in backward; only on the last micro-batch of a step.
                last = micro == args.accum_iter - 1
                with contextlib.nullcontext() if last or ddp_model is model else ddp_model.no_sync():
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = ddp_model(imgs, backend=args.splat)["loss"]
                    # One all-reduce: the mean loss, and whether any process got SIGTERM (all stop together).
                    sigterm = float(preemption is not None and preemption.requested)
                    loss_value, stop = all_reduce_sum([loss.item() / world_size, sigterm], device)
                    if not math.isfinite(loss_value):
                        raise SystemExit(f"loss is {loss_value} at step {step} (epoch {epoch + 1}); stopping. The last "
                                         f"good checkpoint is kept in {args.out}. Try a lower --blr or --clip-grad.")
                    scaler.scale(loss / args.accum_iter).backward()
                sums[0] += loss_value * imgs.shape[0]
                sums[1] += imgs.shape[0]
                got += 1
            if got < args.accum_iter:  # this process's shard ran out (whole batches of broken files):
                epoch_step = steps_per_epoch  # the epoch is over, a little early
                break
            scaler.unscale_(optimizer)  # no-op unless --amp fp16
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
            if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16: the scaler skips such steps itself
                raise SystemExit(f"gradient norm is {norm.item()} at step {step} (epoch {epoch + 1}); stopping. "
                                 f"The last good checkpoint is kept in {args.out}. Try a lower --blr.")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{(sums[1] - seen_before) / (time.time() - t0):.0f}")
            if stop:
                checkpoint(epoch)
                log(f"SIGTERM: saved {ckpt_path} at step {step} ({epoch_step} of {steps_per_epoch} in epoch "
                    f"{epoch + 1}); continue with --resume")
                raise SystemExit(128 + signal.SIGTERM)
            if args.save_every and step % args.save_every == 0 and epoch_step < steps_per_epoch:
                checkpoint(epoch)
        bar.close()
        loss_sum, seen, skipped, fresh = all_reduce_sum(sums + [sums[1] - seen_before], device)
        if seen == 0:
            if skipped:
                raise SystemExit(f"epoch {epoch + 1}: all {int(skipped)} images read were unreadable; check --data")
            break
        if skipped:
            log(f"epoch {epoch + 1}: skipped {int(skipped)} unreadable image files (warnings above name them)")
        if main_process:
            img_per_s = fresh / (time.time() - t0)  # images this session read in this epoch, all processes
            val = reconstruction_metrics(model, val_imgs, args.splat)
            record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                      **{f"val_{k}" if k == "loss" else k: v for k, v in val.items()},
                      "img_per_s": img_per_s, "time_s": time.time() - t_start}
            if skipped:
                record["skipped_images"] = int(skipped)
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            save_epoch_grid(os.path.join(args.out, f"recon_epoch{epoch + 1:03d}.png"), model, val_imgs[:8],
                            args.splat, cfg.patch_size)
        checkpoint(epoch)
        if epoch_step < steps_per_epoch:  # --max-steps
            break
        epoch_step, sums = 0, [0.0, 0, 0]
    log(f"done: {ckpt_path}")
    return model


if __name__ == "__main__":
    main()
