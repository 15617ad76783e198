"""
Write CIFAR-10's official "python version" (pickled arrays) as the image folders the project reads:
DIR/train/<class>/<i>.png and DIR/val/<class>/<i>.png, 2000 training and 500 validation images per class (the
20k / 5k of docs/results.md's CIFAR table; the test batch becomes val/).

    python docs/cifar10_folders.py cifar-10-batches-py cifar10_subset      # then: python study.py long --cifar cifar10_subset
"""
import argparse
import os
import pickle

import numpy as np
from PIL import Image


def load(src, name):
    with open(os.path.join(src, name), "rb") as f:
        return pickle.load(f, encoding="bytes")


def write_folders(src, dst, per_class=(("train", 2000), ("val", 500))):
    """The first per_class images of each class of the training batches (train) and the test batch (val)."""
    classes = [c.decode() for c in load(src, "batches.meta")[b"label_names"]]
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
    for split, n in per_class:
        batches = [load(src, f) for f in files[split]]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
        y = np.concatenate([b[b"labels"] for b in batches])
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(dst, split, name), exist_ok=True)
            for i in np.flatnonzero(y == c)[:n]:
                Image.fromarray(x[i]).save(os.path.join(dst, split, name, f"{i:05d}.png"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the unpacked cifar-10-batches-py/ folder")
    p.add_argument("dst", help="output folder")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.src, "batches.meta")):
        p.error(f"{args.src} has no batches.meta: pass the unpacked cifar-10-batches-py/ folder")
    write_folders(args.src, args.dst)
    print(f"wrote {args.dst}/train and {args.dst}/val")
