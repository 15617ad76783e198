"""
How good is a pretrained encoder? A linear probe and a k-NN classifier on its frozen features.

    python probe.py --ckpt runs/gmae/checkpoint.pt                     # synthetic scenes, ~1 min on 2 CPU cores
    python probe.py --ckpt runs/mae/checkpoint.pt --pool mean
    python probe.py --ckpt runs/gmae/checkpoint.pt --random-init       # the same encoder, untrained: the floor
    python probe.py --ckpt runs/cifar_gmae/checkpoint.pt --data /path/cifar10_subset   # ImageFolder train/ val/
    torchrun --standalone --nproc_per_node 8 probe.py --ckpt ...       # features extracted in 8 shards

Both readings use the encoder of a train.py checkpoint (GMAE and MAE alike), run on the whole image (mask 0):
    features f = encode(encoder, image)        [B, D]: the normalised cls token (or the mean patch token)
Every image's features are extracted once and kept in memory; the probes then never touch the encoder.

1. Linear probe, MAE's protocol (He et al. 2022, Sec. A.2 and util/lars.py):
       logits = W BN(f) + b        BatchNorm without affine (a parameter-free whitening of each feature), then
                                   a linear layer with trunc-normal(0.01) weights
       SGD with momentum 0.9 (or --optimizer lars), no weight decay, lr = blr * batch / 256, per-step linear
       warmup then cosine (engine.lr_at), cross-entropy. MAE: LARS, blr 0.1, batch 16384, 90 epochs, 10 warmup.
   LARS (You et al. 2017) scales each weight matrix's step by 0.001 ||w|| / ||g||, which is made for huge
   batches; at our batch of 256 its steps are 64x smaller than MAE's, so SGD is the default here.
2. Weighted k-NN, DINO's protocol (Caron et al. 2021, eval_knn.py), no training at all:
       f <- f / ||f||;  s_j = <f, f_j> over the training features;  keep the k largest
       score(c) = sum over those k of exp(s_j / T) [label_j = c],   T = 0.07,  prediction = argmax_c score(c)

Prints `top-1 XX.X` (and top-5 with more than 5 classes) on the validation split for each reading, and writes
a JSON result beside the checkpoint: probe_<data>[_<pool>][_random].json.

Shapes: B batch, M training images, V validation images, D encoder width, C classes, k neighbours.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import collate_skip_broken, labelled_splits, split_note
from engine import (
    USER_ERRORS,
    OutputError,
    ReadableBatches,
    add_labelled_data_flags,
    check_flags,
    check_result_file,
    distributed,
    encode,
    gather_objects,
    load_encoder,
    lr_at,
    run_main,
    set_lr,
    topk_accuracy,
    write_whole,
)
from model import Encoder

RESULT_KEYS = ("ckpt", "random_init", "pool", "num_train")  # what marks a JSON file as this script's result

# ---------------------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(encoder, dataset, pool="cls", batch_size=256, workers=0, device="cpu", desc="features",
                     rank=0, world_size=1):
    """Features [M, D] and labels [M] of every readable image in dataset, with the encoder in eval mode; in
    dataset order for one process. Under torchrun each process encodes items rank, rank + W, ... and every
    process gets all of them back, grouped by process (the probes do not depend on the order).
    Unreadable image files are skipped (engine.ReadableBatches)."""
    encoder.eval()
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_skip_broken)
    dim = encoder.norm.normalized_shape[0]
    feats, labels = [torch.zeros(0, dim)], [torch.zeros(0, dtype=torch.long)]  # a shard may read no image
    for imgs, y in tqdm(ReadableBatches(loader), total=len(loader), desc=desc, leave=False, disable=rank != 0):
        feats.append(encode(encoder, imgs.to(device), pool).float().cpu())  # [B, D]
        labels.append(y)
    parts = gather_objects((torch.cat(feats), torch.cat(labels)))  # [(feats, labels)] for one process
    feats, labels = torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])
    if len(feats) == 0:  # every process sees the same gathered count, so all raise together
        raise ValueError(f"{desc}: none of the {len(dataset)} files could be read as an image (warnings above name "
                         "them); nothing to probe")
    return feats, labels


# ---------------------------------------------------------------------------------------------------------
# k-NN (DINO)


def knn_scores(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted k-NN class scores [V, C]: each of the k most cosine-similar training features votes for its
    label with weight exp(similarity / temperature) (DINO, eval_knn.py)."""
    train = F.normalize(train_feats, dim=1)  # [M, D]
    test = F.normalize(test_feats, dim=1)  # [V, D]
    k = min(k, train.shape[0])
    scores = []
    for i in range(0, test.shape[0], chunk):
        sim, idx = (test[i : i + chunk] @ train.T).topk(k, dim=1)  # [v, k] each
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))  # [v, C]
    return torch.cat(scores)


# ---------------------------------------------------------------------------------------------------------
# Linear probe (MAE)


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight matrix's step is scaled by trust = eta ||w|| / ||g + wd w||
    (You et al. 2017); biases and other 1-D parameters take the plain SGD step (as MAE's util/lars.py)."""

    def __init__(self, params, lr=0.1, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = group["eta"] * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
                    d = d * trust
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def linear_head(dim, num_classes):
    """MAE's probe head: BatchNorm1d without affine (eps 1e-6), then Linear with trunc-normal(0.01) weights."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def train_linear_probe(feats, labels, num_classes, epochs=90, batch_size=256, blr=0.1, optimizer="sgd",
                       weight_decay=0.0, warmup_epochs=10, seed=0):
    """Trains linear_head on cached features [M, D] with labels [M]. Returns the head in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = linear_head(feats.shape[1], num_classes)
    lr = blr * batch_size / 256
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, feats.shape[0] // batch_size)  # drop the last partial batch (BatchNorm needs > 1)
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    head.train()
    step = 0
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        order = torch.randperm(feats.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            set_lr(opt, lr_at(step, total, warmup, lr, 0.0))
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


# ---------------------------------------------------------------------------------------------------------
# Both readings


def probe(encoder, train_set, val_set, pool="cls", knn=20, temperature=0.07, epochs=90, warmup_epochs=10,
          batch_size=256, blr=0.1, optimizer="sgd", weight_decay=0.0, seed=0, workers=0, rank=0, world_size=1,
          device="cpu"):
    """Both readings of a frozen encoder on labelled splits: {"linear": {top1, top5, ...}, "knn": {...}}, each
    left out when its epochs / k is 0. Features are extracted in shards by every process; the probes run on
    rank 0, which returns the scores (None elsewhere)."""
    shard = dict(rank=rank, world_size=world_size)
    train_feats, train_labels = extract_features(encoder, train_set, pool, 256, workers, device, "train features",
                                                 **shard)
    val_feats, val_labels = extract_features(encoder, val_set, pool, 256, workers, device, "val features", **shard)
    if rank != 0:
        return None  # the probes are cheap on cached features: rank 0 trains and scores them
    num_classes, scores = train_set.num_classes, {}
    if epochs > 0:
        head = train_linear_probe(train_feats, train_labels, num_classes, epochs, batch_size, blr, optimizer,
                                  weight_decay, warmup_epochs, seed)
        with torch.no_grad():
            scores["linear"] = topk_accuracy(head(val_feats), val_labels)
        scores["linear"].update(epochs=epochs, batch_size=batch_size, blr=blr, optimizer=optimizer)
    if knn > 0:
        votes = knn_scores(train_feats, train_labels, val_feats, num_classes, knn, temperature)
        scores["knn"] = {**topk_accuracy(votes, val_labels), "k": knn, "temperature": temperature}
    return scores


def print_scores(scores):
    """`linear probe   top-1 XX.X  top-5 XX.X` and the same for k-NN."""
    for name, r in scores.items():
        label = "linear probe" if name == "linear" else f"k-NN (k={r['k']})"
        print(f"{label:14s} top-1 {r['top1']:.1f}" + (f"  top-5 {r['top5']:.1f}" if "top5" in r else ""))


# ---------------------------------------------------------------------------------------------------------
# Script


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_labelled_data_flags(p)
    p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="feature: cls token (MAE) or mean patch token")
    p.add_argument("--random-init", action="store_true", help="probe an untrained encoder of the checkpoint's size")
    p.add_argument("--knn", type=int, default=20, help="k of the k-NN classifier (DINO: 20); 0 = skip")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature T (DINO: 0.07)")
    p.add_argument("--epochs", type=int, default=90, help="linear probe epochs (MAE: 90); 0 = skip the probe")
    p.add_argument("--warmup-epochs", type=float, default=10, help="MAE: 10")
    p.add_argument("--batch-size", type=int, default=256, help="linear probe batch (MAE: 16384)")
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr * batch / 256 (MAE: 0.1)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="MAE: lars (at batch 16384)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="MAE: 0")
    p.add_argument("--out", default=None, help="JSON result (default: probe_<data>.json beside the checkpoint)")
    args = p.parse_args(argv)
    check_flags(p, args, at_least_one=("n_synthetic", "n_val", "batch_size"),
                ranges={"warmup_epochs": "[0, inf)", "blr": "(0, inf)", "weight_decay": "[0, inf)",
                        "workers": "[0, inf)", "img_size": "[1, inf)"})
    if args.knn < 0 or args.epochs < 0:
        p.error(f"--knn and --epochs must be >= 0, got {args.knn} and {args.epochs}")
    if args.knn == 0 and args.epochs == 0:
        p.error("--knn 0 and --epochs 0 leave nothing to evaluate")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    args.out = args.out or default_out(args.ckpt, args.data, args.pool, args.random_init)
    try:  # before any work: never over the checkpoint, the data or another file; a folder that can be written
        check_result_file(args.out, [args.ckpt] + ([args.data] if args.data != "synthetic" else []), RESULT_KEYS)
    except OutputError as e:
        p.error(str(e))
    return p, args


def default_out(ckpt, data, pool, random_init):
    """probe_<data>[_mean][_random].json beside the checkpoint."""
    data = "synthetic" if data == "synthetic" else os.path.basename(os.path.normpath(data))
    name = f"probe_{data}" + ("_mean" if pool == "mean" else "") + ("_random" if random_init else "")
    return os.path.join(os.path.dirname(ckpt) or ".", name + ".json")


def main(argv=None):
    """One process, or under torchrun: features extracted in shards by all processes, probes on rank 0."""
    parser, args = get_args(argv)
    with distributed(args.device) as (rank, world_size, device):
        try:
            encoder, cfg = load_encoder(args.ckpt, img_size=args.img_size, device=device)
            train_set, val_set, classes = labelled_splits(  # each image once, as the model sees it at test time
                args.data, cfg.img_size, args.n_synthetic, args.n_val, args.seed, augment=False,
                val_fraction=args.val_fraction)
        except USER_ERRORS as e:
            parser.error(str(e))
        if args.random_init:
            torch.manual_seed(args.seed)
            encoder = Encoder(cfg).to(device)
        if rank == 0:
            print(f"{'random-init' if args.random_init else args.ckpt} ({cfg.decoder} decoder, {cfg.enc_dim}x"
                  f"{cfg.enc_depth}), {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
                  f"pool {args.pool}")
            print(split_note(args.data, args.val_fraction))
        try:
            scores = probe(encoder, train_set, val_set, pool=args.pool, knn=args.knn, temperature=args.temperature,
                           epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                           blr=args.blr, optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed,
                           workers=args.workers, rank=rank, world_size=world_size, device=device)
        except USER_ERRORS as e:  # a split of unreadable files, a rasterizer that cannot build, ...
            parser.error(str(e))
    if scores is None:
        return None  # not rank 0
    print_scores(scores)
    result = {"ckpt": args.ckpt, "random_init": args.random_init, "decoder": cfg.decoder, "data": args.data,
              "pool": args.pool, "img_size": cfg.img_size, "num_train": len(train_set), "num_val": len(val_set),
              **scores}
    write_whole(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_main(main)
