"""A tiny labelled ImageFolder for the probe and fine-tuning tests: classes a linear model separates easily."""
import os

import numpy as np
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40)]  # 4 easy classes


def colour_folder(root, n_train=16, n_val=8, size=16):
    """root/{train,val}/<class>/<i>.png: noisy flat images of one colour per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate(COLOURS):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    return str(root)
