"""
Pretrain GMAE (or plain MAE with --decoder pixels) with the MAE recipe.

    python train.py                                   # ~2 min on a 2-core CPU: 32 px synthetic scenes
    python train.py --gaussians 512 --mask 0.75
    python train.py --decoder pixels                  # the MAE baseline, same code path and loss
    python train.py --data /path/to/imagenet --model base --img-size 224 --patch 16 --gaussians 512 \
                    --epochs 400 --batch-size 256 --warmup-epochs 20      # the paper's setting (GPUs)

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
--resume continues from checkpoint.pt.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import splat
from data import build_dataset
from model import (GMAE, GMAEConfig, lr_at, param_groups, patchify, read_checkpoint, reconstruction_metrics,
                   save_checkpoint, unpatchify)

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
    # 48 = the masked patches of a 32 px image (64 patches x 0.75): the GMAE decoder then sees exactly as many
    # tokens as MAE's, and a step costs what MAE's does plus the splatting (bench.py).
    p.add_argument("--gaussians", type=int, default=48, help="number of Gaussians k (paper: 512)")
    p.add_argument("--mask", type=float, default=0.75, help="mask ratio (paper: 0.75)")
    p.add_argument("--scale-max", type=float, default=1.0, help="c in scale = c*sigmoid(s); largest std c*W/16 px (paper: 1, ablates 0.5/2)")
    p.add_argument("--decoder", default="gaussians", choices=["gaussians", "pixels"], help="GMAE or plain MAE")
    p.add_argument("--loss-on", default="masked", choices=["masked", "all"], help="pixels scored by the loss")
    p.add_argument("--norm-pix", action="store_true", help="per-patch normalised targets (hurts GMAE)")
    p.add_argument("--center-depth", action=argparse.BooleanOptionalAction, default=False,
                   help="subtract each image's mean raw depth before tanh (departure from the paper; README)")
    p.add_argument("--splat", default="auto", choices=splat.BACKENDS, help="rasterizer backend")
    p.add_argument("--epochs", type=int, default=10, help="paper: 400")
    p.add_argument("--batch-size", type=int, default=64, help="per step (paper: 4096 in total)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr; lr = blr * batch / 256 (paper: 1e-4)")
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
    p.add_argument("--val-size", type=int, default=256, help="validation images scored after every epoch")
    return p.parse_args(argv)


def config_from_args(args):
    enc_dim, enc_depth, enc_heads, dec_dim, dec_depth, dec_heads = MODEL_SIZES[args.model]
    return GMAEConfig(
        img_size=args.img_size, patch_size=args.patch, enc_dim=enc_dim, enc_depth=enc_depth, enc_heads=enc_heads,
        dec_dim=dec_dim, dec_depth=dec_depth, dec_heads=dec_heads, mask_ratio=args.mask,
        num_gaussians=args.gaussians, scale_max=args.scale_max, decoder=args.decoder, loss_on=args.loss_on,
        norm_pix=args.norm_pix, center_depth=args.center_depth,
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


def main(argv=None):
    args = get_args(argv)
    cfg = config_from_args(args)  # validates --gaussians, --mask, --img-size / --patch
    if args.epochs < 1 or args.batch_size < 1 or args.val_size < 1:
        raise SystemExit(f"--epochs, --batch-size and --val-size must be >= 1, got {args.epochs}, "
                         f"{args.batch_size} and {args.val_size}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    train_set = build_dataset(args.data, args.img_size, train=True, n_synthetic=args.n_synthetic, seed=args.seed)
    val_set = build_dataset(args.data, args.img_size, train=False, n_synthetic=args.val_size, seed=args.seed)
    if len(train_set) < args.batch_size:
        raise SystemExit(f"the dataset has {len(train_set)} images, fewer than --batch-size {args.batch_size}")
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
    )
    val_imgs = torch.stack([val_set[i][0] for i in range(min(args.val_size, len(val_set)))]).to(device)

    model = GMAE(cfg).to(device)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    start_epoch, step = 0, 0
    if args.resume:
        ckpt = read_checkpoint(ckpt_path, device)
        if ckpt["config"] != cfg:
            raise SystemExit(f"--resume: the checkpoint's config {ckpt['config']} differs from the flags' {cfg}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        print(f"resumed from {ckpt_path} at epoch {start_epoch}, step {step}")

    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{cfg.decoder} decoder, {n_params / 1e6:.2f}M parameters, {len(train_set)} images, "
          f"{steps_per_epoch} steps/epoch, lr {lr:.2e}, device {device}, splat {args.splat}")

    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        t0, seen, loss_sum = time.time(), 0, 0.0
        for imgs, _ in bar:
            if args.max_steps is not None and step >= args.max_steps:
                break
            imgs = imgs.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, lr, args.min_lr)
            loss = model(imgs, backend=args.splat)["loss"]
            if not torch.isfinite(loss):
                raise SystemExit(f"loss is {loss.item()} at step {step} (epoch {epoch + 1}); stopping. The last "
                                 f"good checkpoint is kept in {args.out}. Try a lower --blr or --clip-grad.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            seen += imgs.shape[0]
            loss_sum += loss.item() * imgs.shape[0]
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
        if seen == 0:
            break
        img_per_s = seen / (time.time() - t0)
        val = reconstruction_metrics(model, val_imgs, args.splat)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                  **{f"val_{k}" if k == "loss" else k: v for k, v in val.items()},
                  "img_per_s": img_per_s, "time_s": time.time() - t_start}
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        save_epoch_grid(os.path.join(args.out, f"recon_epoch{epoch + 1:03d}.png"), model, val_imgs[:8],
                        args.splat, cfg.patch_size)
        save_checkpoint(ckpt_path, model, optimizer, cfg, epoch, step)
    print(f"done: {ckpt_path}")
    return model


if __name__ == "__main__":
    main()
