"""
Fine-tune a pretrained encoder end to end for classification (MAE's recipe, scaled down), or train the same
classifier from scratch to see what pretraining is worth.

    python finetune.py --ckpt runs/gmae/checkpoint.pt                  # synthetic scenes, a few minutes on 2 CPU cores
    python finetune.py --ckpt runs/gmae/checkpoint.pt --from-scratch   # same model and recipe, random init
    python finetune.py --ckpt runs/cifar_gmae/checkpoint.pt --data /path/cifar10_subset --epochs 20
    torchrun --standalone --nproc_per_node 8 finetune.py --ckpt ...    # DDP as train.py; lr from batch x 8

Model: the checkpoint's encoder (GMAE and MAE checkpoints alike), whole image (mask 0), then
    logits = Linear(pool(encoder(image)))      pool: mean of the patch tokens (MAE fine-tuning) or cls token
Recipe (MAE, He et al. 2022, Sec. A.3; numbers in brackets are MAE's for ViT-B). The GMAE paper's own recipe
(its appendix, Table 6) differs: weight decay 0.01, cutmix 0.5, drop path 0.2, layer decay 0.8, linear lr decay,
90 epochs (Sec. 4.2 says 100), "BasicAug"; docs/design.md 7 lists it.
    AdamW, betas (0.9, 0.999), weight decay 0.05 except biases, norms and tokens, lr = blr * batch / 256 [5e-4],
    per-step linear warmup then cosine (engine.lr_at)
    layer-wise lr decay (BEiT, Bao et al. 2021): parameters of layer l get lr * decay^(L + 1 - l), with
        l = 0 for the patch embedding, cls token and position embedding, l = i + 1 for block i, and
        l = L + 1 for the final norm and the head (L = encoder depth)  [0.65 in MAE; the GMAE paper: 0.8].
        Default 0.65: with 6 blocks it gives the patch embedding 0.65^7 = 0.05 of the head's lr, as ViT-B's
        12 blocks at 0.8 do (0.8^13 = 0.05).
    drop path (stochastic depth) rising linearly to --drop-path in the last block [0.1]
    mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019), one per batch, with label smoothing [0.8, 1.0, 0.1]
    light augmentation: random resized crop (scale 0.2-1) and horizontal flip [RandAugment (9, 0.5), erasing]
Every epoch: top-1 (and top-5 with more than 5 classes) on the validation split; writes finetune_last.pt,
finetune_best.pt (best top-1) and finetune.json into --out (default: finetune[_scratch]/ beside the checkpoint).

Shapes: B batch, N patches, D encoder width, C classes.
"""
import argparse
import json
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import check_readable, collate_skip_broken, labelled_splits, make_loader, split_note
from engine import (
    USER_ERRORS,
    ReadableBatches,
    add_labelled_data_flags,
    all_reduce_sum,
    any_process,
    atomic_save,
    check_flags,
    claim_run_folder,
    distributed,
    encode,
    load_encoder,
    lr_at,
    read_checkpoint,
    run_main,
    set_lr,
    skips_weight_decay,
    topk_accuracy,
    wrap_ddp,
    write_whole,
)
from model import Encoder, GMAEConfig

RUN_MARKS = ("finetune_best.pt", "finetune_last.pt", "finetune.json")  # an --out holding one holds a fine-tuning


class Classifier(nn.Module):
    """encoder -> pooled feature [B, D] -> Linear -> logits [B, C]. Head init as MAE: trunc-normal(2e-5)."""

    def __init__(self, encoder, dim, num_classes, pool="mean"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):  # [B, 3, H, W] in [0, 1] -> [B, C]
        return self.head(encode(self.encoder, imgs, self.pool))


# ---------------------------------------------------------------------------------------------------------
# Layer-wise lr decay (BEiT / MAE util/lr_decay.py)


def layer_id(name, depth):
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for the final norm and the head."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_decay_groups(model, weight_decay, layer_decay, depth):
    """AdamW groups, one per (layer, decay or not), each with lr_scale = layer_decay^(depth + 1 - layer)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, no_wd = layer_id(name, depth), skips_weight_decay(name, p)
        group = groups.setdefault((lid, no_wd), {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                                 "lr_scale": layer_decay ** (depth + 1 - lid)})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------
# Mixup / cutmix with label smoothing (after timm.data.Mixup, batch mode)


def smooth_one_hot(labels, num_classes, smoothing):
    """[B] -> [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere (rows sum to 1)."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off).scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(H, W, lam):
    """A box of area about (1 - lam) H W at a uniform random centre, clipped to the image: (top, bottom, left, right)."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(H * cut), int(W * cut)
    cy, cx = torch.randint(0, H, (1,)).item(), torch.randint(0, W, (1,)).item()
    return max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)


def mix_batch(imgs, labels, num_classes, mixup=0.8, cutmix=1.0, smoothing=0.1):
    """Mixes each image with the batch's reversed copy and returns (imgs [B, 3, H, W], soft targets [B, C]).
    Random numbers come from torch's global generator (seed it for a repeatable run).

    With both alphas > 0, each batch takes mixup or cutmix with probability 1/2 (timm's switch_prob 0.5).
        lam ~ Beta(alpha, alpha)
        mixup:  x = lam x + (1 - lam) x_rev
        cutmix: x = x with a box of area (1 - lam) H W pasted from x_rev; lam <- 1 - box area / (H W) exactly
        target = lam y + (1 - lam) y_rev,  y = smooth_one_hot(label)        (each row sums to 1)
    """
    y = smooth_one_hot(labels, num_classes, smoothing)
    if mixup <= 0 and cutmix <= 0:
        return imgs, y
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    rev = imgs.flip(0)
    if use_cutmix:
        H, W = imgs.shape[-2:]
        top, bottom, left, right = cutmix_box(H, W, lam)
        imgs = imgs.clone()
        imgs[:, :, top:bottom, left:right] = rev[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (H * W)
    else:
        imgs = lam * imgs + (1 - lam) * rev
    return imgs, lam * y + (1 - lam) * y.flip(0)


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets [B, C]: mean over the batch of -sum_c t_c log softmax(logits)_c."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1 and (with more than 5 classes) top-5 accuracy in percent over the loader."""
    model.eval()
    scored = [(model(imgs.to(device)).float().cpu(), y) for imgs, y in ReadableBatches(loader)]
    if not scored:
        raise ValueError("no validation image could be read (warnings above name the files); nothing to score")
    logits, labels = zip(*scored)
    return topk_accuracy(torch.cat(logits), torch.cat(labels))  # [V, C], [V]


def save_classifier(path, model, cfg, num_classes, classes, epoch, metrics):
    """engine.atomic_save. "model" holds encoder.* and head.* weights, so engine.load_encoder reads the encoder back."""
    atomic_save({"model": model.state_dict(), "config": asdict(cfg), "kind": "finetune", "num_classes": num_classes,
                 "classes": classes, "pool": model.pool, "epoch": epoch, "metrics": metrics}, path)


def train_one_epoch(model, loader, optimizer, schedule, step, num_classes, mixup=0.8, cutmix=1.0, smoothing=0.1,
                    clip_grad=0.0, device="cpu", desc="", show=True):
    """One pass over loader with mixed batches and soft cross-entropy; the lr follows engine.lr_at(step,
    *schedule) per iteration, scaled per group by its layer-decay lr_scale (engine.set_lr).
    schedule: (total steps, warmup steps, peak lr, min lr); step: the schedule position of the epoch's first step.
    Whole batches of unreadable files are read past, so a shard can run out before len(loader) steps; under
    torchrun every process then stops at the same step (engine.any_process). Returns (summed loss, images seen)."""
    model.train()
    loss_sum, seen = 0.0, 0
    batches = ReadableBatches(loader)  # past whole batches of unreadable files
    for _ in tqdm(range(len(loader)), desc=desc, leave=False, disable=not show):
        batch = next(batches, None)
        if any_process(batch is None, device):  # before the forward: all processes take the step or none
            break
        imgs, targets = mix_batch(*batch, num_classes, mixup, cutmix, smoothing)
        set_lr(optimizer, lr_at(step, *schedule))
        loss = soft_cross_entropy(model(imgs.to(device)), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        step += 1
        loss_sum += loss.item() * imgs.shape[0]
        seen += imgs.shape[0]
    return loss_sum, seen


def finetune(encoder, cfg, train_set, val_set, out, pool="mean", epochs=10, warmup_epochs=1, batch_size=64,
             blr=1e-3, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65, mixup=0.8, cutmix=1.0, smoothing=0.1,
             clip_grad=0.0, workers=0, seed=0, rank=0, world_size=1, device="cpu", name="pretrained"):
    """The recipe: Classifier on encoder, AdamW with layer-decay groups, warmup + cosine, mixup / cutmix; rank 0
    evaluates every epoch and writes finetune_last.pt and finetune_best.pt into out. Returns (history, best) of
    per-epoch metrics on rank 0, None elsewhere. batch_size is per process; lr follows the global batch."""
    device = torch.device(device)
    os.makedirs(out, exist_ok=True)
    num_classes = train_set.num_classes
    model = Classifier(encoder, cfg.enc_dim, num_classes, pool).to(device)
    ddp_model = wrap_ddp(model, device)  # = model for one process
    if world_size > 1:
        torch.manual_seed(seed + rank)  # own mixup, cutmix and drop path per process (crops: data.SeededItems)
    # Each process reads its shard of every epoch's permutation (data.make_loader); rank 0 evaluates and saves.
    train_loader, sampler = make_loader(train_set, batch_size, rank, world_size, seed=seed, workers=workers)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=workers,
                                             collate_fn=collate_skip_broken)
    lr = blr * batch_size * world_size / 256  # the global batch
    groups = layer_decay_groups(model, weight_decay, layer_decay, cfg.enc_depth)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
    schedule = (epochs * len(train_loader), int(warmup_epochs * len(train_loader)), lr, min_lr)
    if rank == 0:
        print(f"{name} ({cfg.decoder} pretraining, {cfg.enc_dim}x{cfg.enc_depth}), {len(train_set)} train / "
              f"{len(val_set)} val images, {num_classes} classes, lr {lr:.2e}, out {out}")

    history, best = [], None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        # Each epoch starts at its place in the schedule, also after one that ended early: the cosine reaches min_lr.
        loss_sum, seen = train_one_epoch(ddp_model, train_loader, optimizer, schedule, epoch * len(train_loader),
                                         num_classes, mixup, cutmix, smoothing, clip_grad, device,
                                         f"epoch {epoch + 1}/{epochs}", show=rank == 0)
        loss_sum, seen = all_reduce_sum([loss_sum, seen], device)  # over all processes
        if seen == 0:  # on every process alike: a shard read no image before it ran out
            raise ValueError(f"epoch {epoch + 1}: no training step could be taken, a process's shard of the training "
                             "split held no readable image (warnings above name the files); check --data")
        if rank != 0:
            continue
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / seen, **evaluate(model, val_loader, device)}
        history.append(metrics)
        print(" ".join(f"{k} {v:.4f}" if k == "train_loss" else f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics.items()))
        save_classifier(os.path.join(out, "finetune_last.pt"), model, cfg, num_classes, train_set.classes, epoch, metrics)
        if best is None or metrics["top1"] > best["top1"]:
            best = metrics
            save_classifier(os.path.join(out, "finetune_best.pt"), model, cfg, num_classes, train_set.classes, epoch, metrics)
    return (history, best) if rank == 0 else None


# ---------------------------------------------------------------------------------------------------------
# Script


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_labelled_data_flags(p)
    p.add_argument("--from-scratch", action="store_true", help="random init (the checkpoint's size if it exists, "
                   "else the tiny default): the same recipe without pretraining")
    p.add_argument("--pool", default="mean", choices=["mean", "cls"], help="MAE fine-tuning: mean")
    p.add_argument("--epochs", type=int, default=10, help="MAE ViT-B: 100")
    p.add_argument("--warmup-epochs", type=float, default=1, help="MAE: 5")
    p.add_argument("--batch-size", type=int, default=64, help="MAE: 1024")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr; lr = blr * batch / 256 (MAE ViT-B: 5e-4)")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.65, help="per-block lr decay (MAE ViT-B: 0.65; paper: 0.8)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (MAE: 0.1)")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup Beta alpha, 0 = off (MAE: 0.8)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix Beta alpha, 0 = off (MAE: 1.0)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (MAE: 0.1)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm, 0 = off (MAE: off)")
    p.add_argument("--out", default=None, help="output folder (default: finetune[_scratch]/ beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a fine-tuning")
    args = p.parse_args(argv)
    check_flags(p, args, at_least_one=("epochs", "batch_size", "n_synthetic", "n_val"),
                ranges={"warmup_epochs": "[0, inf)", "blr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
                        "clip_grad": "[0, inf)", "workers": "[0, inf)", "img_size": "[1, inf)"})
    if not 0 < args.layer_decay <= 1:
        p.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if not 0 <= args.drop_path < 1 or not 0 <= args.smoothing < 1:
        p.error(f"--drop-path and --smoothing must be in [0, 1), got {args.drop_path} and {args.smoothing}")
    if args.mixup < 0 or args.cutmix < 0:
        p.error(f"--mixup and --cutmix must be >= 0, got {args.mixup} and {args.cutmix}")
    return p, args


def build_encoder(ckpt, from_scratch=False, img_size=None, drop_path=0.0):
    """(encoder, cfg): the checkpoint's encoder, or from_scratch a fresh one of the same size (the tiny default
    size when there is no checkpoint). Raises FileNotFoundError, ValueError or engine.CheckpointError."""
    if not from_scratch:
        return load_encoder(ckpt, img_size=img_size, drop_path=drop_path)
    cfg = read_checkpoint(ckpt)["config"] if os.path.isfile(ckpt) else GMAEConfig()
    if img_size is not None:
        cfg = GMAEConfig(**{**asdict(cfg), "img_size": img_size})
    return Encoder(cfg, drop_path=drop_path), cfg


def default_out(ckpt, from_scratch):
    """finetune/ (or finetune_scratch/) beside the checkpoint."""
    return os.path.join(os.path.dirname(ckpt) or ".", "finetune_scratch" if from_scratch else "finetune")


def main(argv=None):
    """One process, or DistributedDataParallel under torchrun (as train.py; lr from the global batch)."""
    parser, args = get_args(argv)
    out = args.out or default_out(args.ckpt, args.from_scratch)
    with distributed(args.device) as (rank, world_size, device):
        torch.manual_seed(args.seed)  # a from-scratch encoder's init, then the head's
        try:
            if rank == 0:  # before any work: refused if out holds a fine-tuning (unless --overwrite); locked
                claim_run_folder(out, False, args.overwrite, RUN_MARKS,
                                 inputs=[args.ckpt] + ([args.data] if args.data != "synthetic" else []))
            encoder, cfg = build_encoder(args.ckpt, args.from_scratch, args.img_size, args.drop_path)
            train_set, val_set, _ = labelled_splits(args.data, cfg.img_size, args.n_synthetic, args.n_val, args.seed,
                                                    val_fraction=args.val_fraction)
            check_readable(val_set, "the validation split")  # found now, not after the first epoch's training
        except USER_ERRORS as e:
            parser.error(str(e))
        if rank == 0:
            print(split_note(args.data, args.val_fraction))
        if len(train_set) < args.batch_size * world_size:
            parser.error(f"the training split has {len(train_set)} images, fewer than --batch-size {args.batch_size} "
                         f"x {world_size} processes")
        try:
            trained = finetune(encoder, cfg, train_set, val_set, out, pool=args.pool, epochs=args.epochs,
                               warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, blr=args.blr,
                               min_lr=args.min_lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                               mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing,
                               clip_grad=args.clip_grad, workers=args.workers, seed=args.seed, rank=rank,
                               world_size=world_size, device=device,
                               name="from scratch" if args.from_scratch else args.ckpt)
        except USER_ERRORS as e:  # an epoch with no readable batch, an unreadable val split, ...
            parser.error(str(e))
    if trained is None:
        return None  # not rank 0
    history, best = trained
    result = {"ckpt": None if args.from_scratch else args.ckpt, "from_scratch": args.from_scratch, "decoder": cfg.decoder,
              "data": args.data, "best": best, "last": history[-1], "history": history,
              "args": {k: v for k, v in vars(args).items() if k not in ("device", "out")}}
    write_whole(os.path.join(out, "finetune.json"), json.dumps(result, indent=1).encode())
    print(f"top-1 {best['top1']:.1f} (best, epoch {best['epoch']}); last top-1 {history[-1]['top1']:.1f}; wrote {out}")
    return result


if __name__ == "__main__":
    run_main(main)
