"""
Speed of the splatting backends and of a GMAE training step against MAE, as ratios measured in one run.

    python bench.py                      # every backend that loads here, all scenes, training step at defaults
    python bench.py --splat cpu torch --json bench.json
    python bench.py --quick              # fewer repeats (smoke test)

1. Rasterization, forward + backward through splat.render, batch 16 of random Gaussians
   (splat.random_gaussians), for each scene (H x W / K): 32x32/64, 64x64/256, 64x64/1024, 128x128/4096.
   Reported: median ms per batch and the speed-up over the torch reference (same scenes, same run).
   The dense reference holds several [B, H*W, K] tensors; above --max-dense-gb it is skipped and says so.
2. Training step (forward, backward, AdamW step) at train.py's defaults: GMAE with each splat backend vs
   MAE (--decoder pixels), steps interleaved so machine noise hits both alike. The paper reports that
   splatting adds about 1.5 % to a step on GPUs (GMAE / MAE = 1.015).

Machines are shared and noisy: compare ratios within one run, never absolute times across runs.
"""
import argparse
import json
import statistics
import time

import torch

import splat
import train
from data import build_dataset
from model import GMAE

SCENES = [(32, 64), (64, 256), (64, 1024), (128, 4096)]  # (image side, Gaussians)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats, device, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def device_of(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


def bench_render(backends, batch, repeats, max_dense_gb):
    rows = []
    for size, k in SCENES:
        g = splat.random_gaussians(batch, k, generator=torch.Generator().manual_seed(0))
        row = {"scene": f"{size}x{size}/{k}", "ms": {}}
        for backend in backends:
            dense_gb = 6 * batch * size * size * k * 4 / 1e9  # ~6 live [B, HW, K] float32 tensors
            if backend == "torch" and dense_gb > max_dense_gb:
                row["ms"][backend] = None
                continue
            dev = device_of(backend)
            x = g.to(dev).requires_grad_()

            def step():
                splat.render(x, size, size, backend=backend).sum().backward()
                x.grad = None

            row["ms"][backend] = median_ms(step, repeats, dev)
        rows.append(row)
    return rows


def bench_train_step(backends, repeats):
    """GMAE (each backend) and MAE training steps at train.py's defaults, interleaved."""
    args = train.get_args([])
    data = build_dataset("synthetic", args.img_size, train=True, n_synthetic=args.batch_size)
    imgs = torch.stack([data[i][0] for i in range(args.batch_size)])
    runs = {f"gmae/{b}": ("gaussians", b) for b in backends} | {"mae": ("pixels", "torch")}
    steps = {}
    for name, (decoder, backend) in runs.items():
        torch.manual_seed(0)
        cfg = train.config_from_args(train.get_args(["--decoder", decoder]))
        dev = device_of(backend)
        model = GMAE(cfg).to(dev)
        opt = torch.optim.AdamW(train.param_groups(model, args.weight_decay), lr=1e-4, betas=(0.9, 0.95))
        x = imgs.to(dev)

        def step(model=model, opt=opt, x=x, backend=backend):
            loss = model(x, backend=backend)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = (step, dev)
    times = {name: [] for name in steps}
    for _ in range(repeats + 1):  # round-robin; the first round is warm-up
        for name, (step, dev) in steps.items():
            times[name].append(median_ms(step, 1, dev, warmup=0))
    ms = {name: statistics.median(t[1:]) for name, t in times.items()}
    # The splatting part alone, on Gaussians of the same count and batch: its share of the GMAE step.
    render_ms = {}
    for backend in backends:
        dev = device_of(backend)
        g = splat.random_gaussians(args.batch_size, args.gaussians, torch.Generator().manual_seed(0))
        g = g.to(dev).requires_grad_()
        render_ms[backend] = median_ms(lambda: splat.render(g, args.img_size, args.img_size, backend=backend)
                                       .sum().backward(), repeats, dev)
    return {"batch": args.batch_size, "img_size": args.img_size, "gaussians": args.gaussians, "ms": ms,
            "ratio_to_mae": {name: ms[name] / ms["mae"] for name in ms if name != "mae"},
            "render_ms": render_ms, "render_share": {b: render_ms[b] / ms[f"gmae/{b}"] for b in backends}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splat", nargs="+", default=None, choices=splat.BACKENDS[1:],
                   help="backends to time (default: every one that loads here)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-repeats", type=int, default=15)
    p.add_argument("--max-dense-gb", type=float, default=6.0, help="skip the torch reference above this")
    p.add_argument("--quick", action="store_true", help="2 repeats each (smoke test)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.train_repeats = 2, 2
    backends = args.splat or splat.available_backends()
    if "torch" not in backends:
        backends = ["torch"] + backends  # the reference every ratio is taken against
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {backends}")

    rows = bench_render(backends, args.batch, args.repeats, args.max_dense_gb)
    fast = [b for b in backends if b != "torch"]
    print(f"\nrasterize forward+backward, batch {args.batch}, median ms (speed-up over torch)")
    print(f"{'scene':>14} " + " ".join(f"{b:>20}" for b in backends))
    for row in rows:
        ref = row["ms"]["torch"]
        row["speedup"] = {b: ref / row["ms"][b] for b in fast if ref is not None and row["ms"][b]}
        cells = []
        for b in backends:
            ms = row["ms"][b]
            text = "skipped (memory)" if ms is None else f"{ms:.1f}"
            if b in row["speedup"]:
                text += f" ({row['speedup'][b]:.0f}x)"
            cells.append(f"{text:>20}")
        print(f"{row['scene']:>14} " + " ".join(cells))

    step = bench_train_step(fast or ["torch"], args.train_repeats)
    print(f"\ntraining step at train.py defaults ({step['img_size']} px, {step['gaussians']} Gaussians, "
          f"batch {step['batch']}), median ms and ratio to MAE")
    for name, ms in step["ms"].items():
        ratio = step["ratio_to_mae"].get(name)
        backend = name.split("/")[-1]
        share = f", splatting {step['render_share'][backend]:.1%} of it" if backend in step["render_share"] else ""
        print(f"{name:>14} {ms:8.1f}" + (f"   GMAE / MAE = {ratio:.3f}{share}" if ratio else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"render": rows, "train_step": step, "threads": torch.get_num_threads()}, f, indent=1)
    return rows, step


if __name__ == "__main__":
    main()
